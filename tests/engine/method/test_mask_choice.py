"""The mask (``denoise.choose_mask``, and the trainer's) is the global top-k of the (denoised) phase-1 delta:
checked against references written with ``torch.linalg.svd`` and ``torch.topk`` (tests/reference.py), on
matrices that span many of masks.py's chunks (as every real embedding matrix does)."""
import json

import pytest
import reference
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deftx_engine.method import masks
from deftx_engine.method.denoise import choose_mask
from deftx_engine.method.denoise_config import DenoiseConfig
from deftx_engine.training.config import TrainConfig
from deftx_engine.training.phase1 import load_deltas
from deftx_engine.training.runs import RunDir
from deftx_engine.training.train import train_sft
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



def _phase1_like_deltas() -> dict:
    """A row-sparse tall matrix spanning many top-k chunks (an embedding's phase-1 delta), a wide one stored
    transposed (not contiguous), a dense one and a bias: every kind of tensor the trainer hands over."""
    g = torch.Generator().manual_seed(7)
    emb = torch.zeros(3000, 16)
    emb[torch.randperm(3000, generator=g)[:150]] = torch.randn(150, 16, generator=g)
    low_rank = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)
    wide = torch.randn(40, 12, generator=g).T
    dense = low_rank + 0.1 * torch.randn(30, 20, generator=g)
    return {"emb": emb, "wide": wide, "dense": dense, "bias": torch.randn(50, generator=g)}


@pytest.mark.parametrize("scope", ["changed", "matrix"])
def test_choose_mask_is_the_top_k_of_the_denoised_delta(monkeypatch, scope):
    monkeypatch.setattr(masks, "_CHUNK", 1000)
    deltas = _phase1_like_deltas()
    expected_deltas = {n: reference.denoise(d, 0.9, 0.05, scope) if d.dim() == 2 else d for n, d in deltas.items()}
    k = round(0.05 * sum(d.numel() for d in deltas.values()))
    times = {}
    mask, records = choose_mask(deltas, 0.05, DenoiseConfig(energy=0.9, residual_share=0.05, residual_scope=scope),
                                times=times)
    assert set(records) == {"emb", "wide", "dense"} and set(times) == {"denoise", "top_k"}
    for n, d in expected_deltas.items():  # the caller's deltas now hold what the mask was chosen from
        torch.testing.assert_close(deltas[n], d, atol=1e-4, rtol=1e-3)
    chosen = {n: set(i.tolist()) for n, i in mask.items()}
    expected = reference.global_top_k(expected_deltas, k)
    assert sum(len(c) for c in chosen.values()) == k
    assert sum(len(expected[n] - chosen[n]) for n in chosen) <= 2  # float32 vs float64 near-ties


def test_choose_mask_without_denoising_is_the_top_k_of_the_raw_delta(monkeypatch):
    monkeypatch.setattr(masks, "_CHUNK", 1000)
    deltas = _phase1_like_deltas()
    raw = {n: d.clone() for n, d in deltas.items()}
    times = {}
    mask, records = choose_mask(deltas, 400, None, progress=lambda *a: pytest.fail("nothing is denoised"),
                                times=times)
    assert records == {} and set(times) == {"top_k"}
    assert all(torch.equal(deltas[n], raw[n]) for n in raw)
    assert {n: set(i.tolist()) for n, i in mask.items()} == reference.global_top_k(raw, 400)
