"""Helpers shared by the test folders (importable as ``tiny``: pyproject puts tests/ on the path): tiny BERT
configurations and model folders (random weights, no downloads) and random sparse vectors."""
import json
import os
import pickle
import re
import types
from pathlib import Path

import pytest
import torch

from deftx_engine.method.masks import select_top_k
from deftx_engine.method.params import parameter_roles
from deftx_engine.method.vectors import SparseVector, VectorMeta, base_fingerprint

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


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as CI sets it; also 1 / yes)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_nusax(root: Path) -> Path:
    """``root`` if it holds the NusaX data (a ``sentiment`` folder). If not, the test is skipped, saying where
    the data was looked for and why, except in CI, where the data must be there: then the test fails."""
    if (root / "sentiment").is_dir():
        return root
    why = (f"NusaX data not found at {root}: {root / 'sentiment'} is not a folder (shared/ must sit beside the "
           "repository, with shared/data/nusax in it)")
    if in_ci():
        pytest.fail(f"{why}; CI=true, and in CI the tests on the real data must run, not be skipped",
                    pytrace=False)
    pytest.skip(why)


def tiny_bert_config(**kw):
    """A BERT configuration small enough to build in milliseconds; ``kw`` overrides its fields."""
    from transformers import BertConfig

    base = dict(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=64)
    base.update(kw)
    return BertConfig(**base)


def make_vector(model, kind="task", k=200, seed=0, heads=True, base_model="tiny"):
    """A random sparse vector for ``model``: perturb a copy, select top-k, read the diff back."""
    torch.manual_seed(seed)
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    theta0 = {n: params[n].detach().clone() for n in roles.maskable + roles.heads}
    with torch.no_grad():
        for n in roles.maskable + roles.heads:
            params[n].add_(torch.randn_like(params[n]) * 0.01)
    deltas = {n: params[n].detach() - theta0[n] for n in roles.maskable}
    mask = select_top_k(deltas, k)
    meta = VectorMeta(kind=kind, base_model=base_model, base_fingerprint=base_fingerprint(model),
                      label_names=["neg", "neu", "pos"] if kind == "task" else [], language="xx")
    vec = SparseVector.from_diff(meta, theta0, model, mask, roles.heads if heads else ())
    with torch.no_grad():  # back to theta0 for the heads too: a fresh copy of the base
        for n in roles.maskable + roles.heads:
            params[n].copy_(theta0[n])
    return vec


def assert_same_vector(a: SparseVector, b: SparseVector) -> None:
    assert a.meta == b.meta and a.shapes == b.shapes
    for d1, d2 in ((a.indices, b.indices), (a.values, b.values), (a.heads, b.heads)):
        assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)


def write_composable_sft(model, folder: Path, seed: int = 0) -> dict:
    """A composable-sft language SFT: {name: dense diff} over the encoder (LayerNorm too) plus MLM-head diffs."""
    g = torch.Generator().manual_seed(seed)
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    diffs = {}
    for name in roles.maskable + roles.frozen + roles.heads:
        p = params[name]
        keep = torch.rand(p.shape, generator=g) < 0.1
        diffs[name] = torch.randn(p.shape, generator=g) * 0.01 * keep
    assert any(n.startswith("cls.") for n in diffs)  # the head diffs that must be skipped
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(diffs, folder / "pytorch_diff.bin")
    (folder / "config.json").write_text('{"_name_or_path": "tiny-bert", "model_type": "bert"}')
    return diffs


def _encode_like_composable_sft(diff: torch.Tensor) -> dict:
    """composable-sft's ``encode_sparse_tensor`` (src/sft/sft.py), restated: column-major flat indices (first
    dimension fastest), sorted, stored as steps whose first entry is a numpy int64 (``[indices[0]] + steps``)."""
    import numpy as np

    sp = diff.to_sparse().coalesce()
    multipliers = np.cumprod([1] + list(sp.size())[:-1], dtype=np.int64)
    flat = multipliers @ sp.indices().numpy().astype(np.int64)
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    steps = [flat[0]] + (flat[1:] - flat[:-1]).tolist() if len(flat) else []
    return {"size": sp.size(), "index_steps": steps, "values": sp.values()[torch.from_numpy(order)]}


class _Numpy1Pickler(pickle._Pickler):
    """Names numpy scalars as numpy 1.x did (``numpy.core.multiarray.scalar``): the released files were written
    so in 2021-2022."""

    def save_global(self, obj, name=None):
        import numpy as np

        if obj is getattr(getattr(np, "_core", np.core), "multiarray").scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_released_sft(model, folder: Path, kind: str = "language", seed: int = 0,
                       base_model: str = "tiny-bert") -> tuple[dict, dict]:
    """A composable-sft SFT as ``SFT.save`` writes the released ones: ``{'diffs': {name: encoded diff},
    'abs': {name: whole tensor}}`` in ``pytorch_diff.bin``, plus the model's config.json. Language: diffs over
    the encoder and the MLM head; task: diffs over the encoder, the classifier whole in 'abs'.
    Returns (dense diffs, abs)."""
    g = torch.Generator().manual_seed(seed)
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    names = roles.maskable + roles.frozen + (roles.heads if kind == "language" else [])
    diffs = {}
    for name in names:
        keep = torch.rand(params[name].shape, generator=g) < 0.1
        diffs[name] = torch.randn(params[name].shape, generator=g) * 0.01 * keep
    abs_ = {n: torch.randn(params[n].shape, generator=g) for n in roles.heads} if kind == "task" else {}
    folder.mkdir(parents=True, exist_ok=True)
    pickler = types.SimpleNamespace(__name__="numpy1_pickle", Pickler=_Numpy1Pickler)
    torch.save({"diffs": {n: _encode_like_composable_sft(d) for n, d in diffs.items()}, "abs": abs_},
               folder / "pytorch_diff.bin", pickle_module=pickler)
    (folder / "config.json").write_text(json.dumps({"_name_or_path": base_model,
                                                    "model_type": model.config.model_type}))
    return diffs, abs_


XLMR = "FacebookAI/xlm-roberta-base"  # the released vectors' base model, served by the local Hub as a tiny BERT
RELEASED = {"language": "cambridgeltl/xlmr-lang-sft-jav-small", "task": "cambridgeltl/xlmr-task-sft-nusax_senti",
            "other base": "cambridgeltl/mbert-lang-sft-wol-small"}


def publish_tiny_release(hub, folder: Path) -> Path:
    """On the local Hub ``hub`` (tests/hub_server.py): a tiny base model as ``XLMR`` (config, weights,
    tokenizer), composable-sft releases made for it (a Javanese language SFT, the NusaX sentiment task SFT) and
    an mBERT one that holds no vector (it must never be downloaded). Returns the base model's folder."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    base = make_tiny_model_dir(folder / "base")
    config = BertConfig.from_pretrained(base)
    torch.manual_seed(0)
    write_released_sft(BertForMaskedLM(config), folder / "lang", kind="language", seed=1, base_model=XLMR)
    write_released_sft(BertForSequenceClassification(BertConfig.from_pretrained(base, num_labels=3)),
                       folder / "task", kind="task", seed=2, base_model=XLMR)
    hub.add_repo(XLMR, base)
    hub.add_repo(RELEASED["language"], folder / "lang")
    hub.add_repo(RELEASED["task"], folder / "task")
    hub.add_repo(RELEASED["other base"], {"pytorch_diff.bin": b"never downloaded"})
    return base
