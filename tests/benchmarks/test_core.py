"""benchmarks/core.py (python -m benchmarks.core) runs end to end on tiny shapes and prints every measured line."""
import importlib
import math

import pytest


def load_core():
    return importlib.import_module("benchmarks.core")


def test_tiny_run_prints_every_figure(capsys):
    core = load_core()
    results = core.main(["--shapes", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out

    for line in ("| denoise all (energy 0.90, rho 0.05, inplace) |",
                 "| global top-k (k = ",
                 "| denoise + top-k total |",
                 "| apply (validate + index_add_) |",
                 "| revert (write back saved entries) |",
                 "| compose of two ",
                 "| save (safetensors + JSON, atomic rename) |",
                 "| load (+ check) |",
                 "| file size on disk |",
                 "| peak extra / model size |",
                 "| torch.linalg.svd(full_matrices=False), run once |",
                 "| svd time / Gram-eigh time |",
                 "| max |sigma_gram - sigma_svd| / sigma_max |",
                 "| Gram accumulation (float64) |",
                 "| residual top-k: radix threshold (2 histogram passes) |",
                 "| sum of the engine's steps |",
                 "| apply: index_add_ |",
                 "| revert: write back (index_copy_) |",
                 "| apply: save old entries (index_select on int32 indices) |",
                 "| other processes' CPU use during the timed repeats |"):
        assert line in out, f"missing table line {line!r}"
    assert "| revert restores bit-exactly (checked, every repeat) | yes | bit-exact | yes |" in out
    assert "| applied entries equal theta0 + phi exactly | yes |" in out
    assert results["revert_bit_exact"] is True and not results["missed"]
    # the tiny shape set: 7,296 maskable entries, k at the paper's share (14,155,776 of 277,414,656)
    assert results["maskable"] == 7296 and results["k"] == round(7296 * 14_155_776 / 277_414_656)
    assert results["sigma_rel_err"] < 1e-4
    assert results["step1_total_s"] < 30


@pytest.mark.parametrize("broken_call", [1, 2])
def test_a_revert_that_does_not_restore_is_reported(monkeypatch, capsys, broken_call):
    """revert() is checked against the copy of theta0 taken before apply, on every repeat: a revert that leaves
    the vector in the model (on its first call, or only on a later one) turns the row to NO and misses its
    target instead of being reported as bit-exact."""
    from deftx_engine.method import vectors
    from deftx_engine.method.vectors import SparseVector

    core = load_core()
    real = SparseVector.revert
    calls = []

    def revert(self, model, *, times=None):
        calls.append(1)
        if len(calls) == broken_call:
            vectors._APPLIED[model].pop()  # forget the saved entries: the model keeps theta0 + phi
            return model
        return real(self, model, times=times)

    monkeypatch.setattr(SparseVector, "revert", revert)
    results = core.main(["--shapes", "tiny", "--repeats", "2"])
    out = capsys.readouterr().out
    assert len(calls) >= 4  # two timed repeats, two split repeats
    assert results["revert_bit_exact"] is False
    assert "| revert restores bit-exactly (checked, every repeat) | NO | bit-exact | **NO (missed)** |" in out
    assert "revert restores bit-exactly (checked, every repeat)" in results["missed"]
    # the model was put back to theta0 after the broken revert: the applies after it are still exact
    assert "| applied entries equal theta0 + phi exactly | yes |" in out


def test_xlmr_shapes_match_the_published_model():
    core = load_core()
    factory, _ = core._encoder_factory("xlmr-base")
    shapes, numel = core.maskable_shapes(factory)
    assert sum(math.prod(s) for s in shapes.values()) == core.XLMR_BASE_MASKABLE
    assert numel == 277_453_056  # xlm-roberta-base's 278,043,648 minus the pooler
    assert shapes["embeddings.word_embeddings.weight"] == (250_002, 768)
    assert not any("LayerNorm" in n for n in shapes)
    assert core.task_k(core.XLMR_BASE_MASKABLE) == 14_155_776


def test_repeats_must_be_positive():
    with pytest.raises(SystemExit):
        load_core().main(["--shapes", "tiny", "--repeats", "0"])


def test_row_sparse_embeddings_and_the_residual_scope():
    """--changed-rows leaves the word-embedding delta nonzero in that many rows; --residual-scope reaches
    denoising: counted over the whole matrix the row-sparse delta keeps its whole residual, counted over its
    changed rows it is denoised."""
    import torch

    from benchmarks import core

    emb = "bert.embeddings.word_embeddings.weight"
    shapes = {emb: (120, 16), "bert.encoder.layer.0.output.dense.weight": (16, 16)}
    original = core.make_deltas(shapes, 0, 0.05, changed_rows=3)
    assert int((original[emb] != 0).any(1).sum()) == 3
    assert bool((original["bert.encoder.layer.0.output.dense.weight"] != 0).all())
    for scope, kept in (("matrix", round(0.05 * 120 * 16)), ("changed", round(0.05 * 3 * 16))):
        lines: list[str] = []
        deltas, _, _ = core.step1(shapes, 50, 1, 0, 0.05, core.Table(lines.append), {}, changed_rows=3,
                                  residual_scope=scope)
        text = "\n".join(lines)
        assert f"3 changed rows; residual scope {scope}" in text and f"residual entries kept {kept:,})" in text
        assert torch.allclose(deltas[emb], original[emb], atol=1e-6) == (scope == "matrix")


def test_step1_only_times_denoise_and_top_k_alone(capsys):
    from benchmarks import core

    results = core.main(["--shapes", "tiny", "--repeats", "1", "--step1-only", "--changed-rows", "5",
                         "--residual-scope", "matrix"])
    out = capsys.readouterr().out
    assert "word embeddings: 5 changed rows; residual scope matrix" in out and results["step1_total_s"] > 0
    assert "revert_bit_exact" not in results and "### 2." not in out  # the vector steps did not run
