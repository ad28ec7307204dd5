"""A tiny BERT (random weights, word-level vocab from the example data) saved as a local HF folder."""
import re
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "examples"


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = set()
    for f in ASSETS.glob("*"):
        if f.suffix in (".txt", ".csv", ".jsonl"):
            words.update(re.findall(r"\w+|[^\w\s]", f.read_text(encoding="utf-8").lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    path.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path
