"""Phase-1 reuse: a run that reads another run's phase-1 delta gives the vector it would have trained alone."""
import pytest
import torch

from deftx_engine.errors import DeftxError
from deftx_engine.method.vectors import SparseVector
from deftx_engine.training.config import TrainConfig
from deftx_engine.training.phase1 import load_deltas, save_deltas
from deftx_engine.training.runs import RunDir
from deftx_engine.training.train import train_sft
from tiny import ASSETS, make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def _cfg(tiny_dir, kind, **over) -> TrainConfig:
    data = dict(language=dict(data=str(ASSETS / "target_corpus_id.txt"), language="id"),
                task=dict(data=str(ASSETS / "source_task_en.csv"), language="en"))[kind]
    return TrainConfig(**{**dict(kind=kind, base_model=tiny_dir, full_steps=6, sparse_steps=4, lr=1e-3, k=0.05,
                                 batch_size=8, max_length=32, seed=3), **data, **over})


def _same(a: SparseVector, b: SparseVector) -> None:
    assert a.indices.keys() == b.indices.keys()
    for n in a.indices:
        assert torch.equal(a.indices[n], b.indices[n]), n
        assert torch.allclose(a.values[n], b.values[n], atol=1e-6), n
    for n in a.heads:
        assert torch.allclose(a.heads[n], b.heads[n], atol=1e-6), n


@pytest.mark.parametrize("kind", ["language", "task"])
def test_variants_reusing_phase1_match_their_own_runs(tiny_dir, tmp_path, kind):
    cache = tmp_path / "phase1.safetensors"
    donor = _cfg(tiny_dir, kind)  # deftx writes the delta ...
    train_sft(donor, RunDir(tmp_path / "donor"), phase1_cache=cache)
    assert cache.is_file()
    for i, over in enumerate([dict(method="lt-sft"), dict(residual_share=0.0), dict(sparse_phase=False),
                              dict(rank_policy="fixed", rank=4, k=0.02)]):
        cfg = _cfg(tiny_dir, kind, **over)
        assert cfg.phase1_settings() == donor.phase1_settings()
        train_sft(cfg, RunDir(tmp_path / f"alone{i}"))  # ... each variant alone ...
        reused = RunDir(tmp_path / f"reused{i}")
        train_sft(cfg, reused, phase1_cache=cache)  # ... and from the donor's phase 1
        assert "phase 1 reused" in reused.log_file.read_text()
        _same(SparseVector.load(tmp_path / f"alone{i}" / "vector"), SparseVector.load(reused.vector_dir))


def test_delta_file_round_trip_and_refusals(tmp_path):
    emb = torch.zeros(50, 4)
    emb[[3, 17]] = torch.randn(2, 4)  # few changed rows: stored as rows
    deltas = {"emb": emb, "dense": torch.randn(4, 4), "bias": torch.randn(4)}
    f = tmp_path / "d.safetensors"
    save_deltas(f, deltas, {"seed": 1})
    back = load_deltas(f, {"seed": 1}, {n: t.shape for n, t in deltas.items()})
    assert back.keys() == deltas.keys() and all(torch.equal(back[n], deltas[n]) for n in deltas)
    assert load_deltas(tmp_path / "none.safetensors", {"seed": 1}, {}) is None
    with pytest.raises(DeftxError, match="other settings"):
        load_deltas(f, {"seed": 2}, {n: t.shape for n, t in deltas.items()})
    # a file written before a TrainConfig field existed holds for that field's default
    assert load_deltas(f, {"seed": 1, "param_groups": "all"}, {n: t.shape for n, t in deltas.items()}) is not None
    with pytest.raises(DeftxError, match="other settings"):
        load_deltas(f, {"seed": 1, "param_groups": "ffn"}, {n: t.shape for n, t in deltas.items()})
    with pytest.raises(DeftxError, match="other parameters"):
        load_deltas(f, {"seed": 1}, {"emb": emb.shape})


def test_phase1_settings_leave_out_only_what_phase2_reads():
    a = TrainConfig(kind="task", data="x.csv")
    assert a.phase1_settings() != TrainConfig(kind="task", data="x.csv", seed=7).phase1_settings()
    assert a.phase1_settings() != TrainConfig(kind="task", data="x.csv", full_steps=9).phase1_settings()
    assert a.phase1_settings() == TrainConfig(kind="task", data="x.csv", method="lt-sft", k=0.01,
                                              sparse_steps=9).phase1_settings()
