"""The trainer's mask is the global top-k of the (denoised) phase-1 delta: checked against references written
with ``torch.linalg.svd`` and ``torch.topk`` (tests/reference.py), on matrices that span many of masks.py's
chunks (as every real embedding matrix does)."""
import json

import pytest
import reference
from safetensors import safe_open
from safetensors.torch import load_file

from deftx_engine import masks
from deftx_engine.config import TrainConfig
from deftx_engine.phase1 import load_deltas
from deftx_engine.runs import RunDir
from deftx_engine.train import train_sft
from tiny import ASSETS, make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.mark.parametrize("method,scope", [("deftx", "changed"), ("deftx", "matrix"), ("lt-sft", "changed")])
def test_trainer_mask_is_the_top_k_of_the_denoised_delta(tiny_dir, tmp_path, monkeypatch, method, scope):
    monkeypatch.setattr(masks, "_CHUNK", 1000)  # the word embedding (~100k entries) spans ~100 chunks
    cfg = TrainConfig(kind="language", base_model=tiny_dir, data=str(ASSETS / "target_corpus_id.txt"), language="id",
                      full_steps=6, sparse_steps=1, lr=1e-3, k=0.05, batch_size=8, max_length=32, seed=3,
                      method=method, residual_scope=scope, residual_share=0.05, energy=0.9)
    run = RunDir(tmp_path / "run")
    train_sft(cfg, run, phase1_cache=tmp_path / "phase1.safetensors")
    chosen = {n: set(t.long().tolist()) for n, t in load_file(str(run.mask_file)).items()}
    k = sum(len(s) for s in chosen.values())
    with safe_open(str(tmp_path / "phase1.safetensors"), "pt") as f:  # the file records its parameters' shapes
        shapes = json.loads(f.metadata()["shapes"])
    deltas = load_deltas(tmp_path / "phase1.safetensors", cfg.phase1_settings(), shapes)
    deltas = {n: deltas[n] for n in chosen}  # the heads' deltas are not maskable
    emb = next(n for n in deltas if n.endswith("word_embeddings.weight"))
    assert deltas[emb].numel() > 50 * 1000 and not (deltas[emb] != 0).any(1).all()  # many chunks, row-sparse
    if method == "deftx":
        deltas = {n: reference.denoise(d, 0.9, 0.05, scope) if d.dim() == 2 else d for n, d in deltas.items()}
    expected = reference.global_top_k(deltas, k)
    missed = sum(len(expected[n] - chosen[n]) for n in chosen)
    assert k == round(0.05 * sum(d.numel() for d in deltas.values()))
    # float32 (engine) and float64 (reference) may order a handful of near-equal entries differently
    assert missed <= max(2, k // 2000), f"{missed} of {k} entries differ from the reference"

