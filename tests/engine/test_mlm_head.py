"""The fitted MLM head: masking, scoring, the fit (stop and resume included) and its cache, on a tiny model."""
import contextlib
import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deftx_engine import mlm_head
from deftx_engine.mlm_head import HeadFitConfig, cached_fit, fit_head, head_parameters, split_heldout
from tiny import ASSETS, make_tiny_model_dir

LINES = (ASSETS / "target_corpus_id.txt").read_text(encoding="utf-8").splitlines()[:40]  # 36 fit, 4 held out
# 3 batches a pass; no early end, so that every fit runs its max_steps
CFG = HeadFitConfig(max_steps=6, batch_size=12, max_length=16, eval_every=2, min_gain=-1e9)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from deftx_engine.models import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from deftx_engine.models import load_mlm_model

    torch.manual_seed(0)
    model = load_mlm_model(tiny_dir)
    assert model.head_is_new
    return model


@pytest.fixture
def new_model(loaded):
    """A fresh copy of the model with its new (random) head each call, as ``train_sft`` loads it."""
    return lambda: copy.deepcopy(loaded)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "heads"


def head(model) -> dict:
    return {n: p.detach().clone() for n, p in head_parameters(model).items()}


def same_head(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def fit_cached(model, tokenizer, log=None, **kw) -> dict:
    torch.manual_seed(0)  # as train_sft's set_seed: the encoder's dropout draws from the global generator
    return cached_fit(model, tokenizer, "tiny", LINES, CFG, progress=log.append if log is not None else None, **kw)


def entry(cache: Path) -> tuple[Path, Path]:
    weights = [p for p in cache.glob("*.safetensors") if ".partial" not in p.name]
    assert len(weights) == 1, weights
    return weights[0], weights[0].with_suffix(".json")


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` as a cache nobody may write: chmod, or for root (whom chmod does not stop) chattr +i."""
    folder.chmod(0o500)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("root without chattr: no way to make a folder read-only here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o700)


# ---- the cache ------------------------------------------------------------------------------------------------
@pytest.fixture
def fitted(new_model, tokenizer, cache):
    """A head fitted and cached: (its parameters, its record)."""
    model = new_model()
    record = fit_cached(model, tokenizer)
    assert not record["cached"] and not record["stopped"] and record["steps"] == CFG.max_steps
    return head(model), record


def test_a_cached_head_is_loaded_with_its_record(fitted, new_model, tokenizer):
    fresh, log = new_model(), []
    record = fit_cached(fresh, tokenizer, log)
    assert record["cached"] and same_head(head(fresh), fitted[0]) and log == []
    assert {k: record[k] for k in ("steps", "heldout", "history")} == \
        {k: fitted[1][k] for k in ("steps", "heldout", "history")}
    assert record["n_lines"] == 40 and record["layer"] is None


def _forge(weights: Path, record_file: Path, tensors: dict) -> None:
    """Replace the entry's tensors and give the record a matching checksum (a damage the checksum cannot see)."""
    save_file(tensors, str(weights))
    record = json.loads(record_file.read_text())
    record["sha256"] = mlm_head._digest(weights.read_bytes(), record)
    record_file.write_text(json.dumps(record))


def _damage(kind: str, weights: Path, record_file: Path) -> None:
    state = load_file(str(weights))
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif kind == "nan":  # same names and shapes, NaN values, the old record (the case)
        save_file({n: torch.full_like(t, float("nan")) for n, t in state.items()}, str(weights))
    elif kind == "nan, checksum matching":
        _forge(weights, record_file, {**state, next(iter(state)): torch.full_like(next(iter(state.values())),
                                                                                  float("inf"))})
    elif kind == "wrong shapes, checksum matching":
        _forge(weights, record_file, {n: t[..., :-1].contiguous() if t.ndim else t for n, t in state.items()})
    elif kind == "a tensor missing, checksum matching":
        _forge(weights, record_file, dict(list(state.items())[1:]))
    elif kind == "record garbage":
        record_file.write_bytes(b"\xff{ not json")
    elif kind == "record a list":
        record_file.write_text("[]")
    elif kind == "record edited":  # a loss changed, the weights not
        record = json.loads(record_file.read_text())
        record["history"][0]["loss"] = 0.001
        record_file.write_text(json.dumps(record))
    elif kind == "record missing":
        record_file.unlink()
    elif kind == "record of an older version":  # no checksum at all
        record = json.loads(record_file.read_text())
        del record["sha256"]
        record_file.write_text(json.dumps(record))
    else:
        raise AssertionError(kind)


DAMAGES = ["truncated", "garbage", "nan", "nan, checksum matching", "wrong shapes, checksum matching",
           "a tensor missing, checksum matching", "record garbage", "record a list", "record edited",
           "record missing", "record of an older version"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_cached_head_is_named_and_fitted_again(fitted, new_model, tokenizer, cache, kind):
    weights, record_file = entry(cache)
    _damage(kind, weights, record_file)
    model, log = new_model(), []
    record = fit_cached(model, tokenizer, log)
    assert not record["cached"] and record["steps"] == CFG.max_steps
    assert any(f"{weights} is damaged" in line for line in log), log
    assert same_head(head(model), fitted[0])  # the same fit again, not the damaged values
    again = new_model()
    assert fit_cached(again, tokenizer)["cached"] and same_head(head(again), fitted[0])  # the entry is whole again


def test_a_read_only_cache_costs_a_refit_never_the_run(new_model, tokenizer, cache):
    cache.mkdir(parents=True)
    with read_only(cache):
        model, log = new_model(), []
        record = fit_cached(model, tokenizer, log)
        assert not record["cached"] and record["steps"] == CFG.max_steps
        assert any(f"could not cache the MLM head in {cache}" in line for line in log), log
        assert list(cache.iterdir()) == []
        stopped = fit_cached(new_model(), tokenizer, log, stop=lambda: True)  # a stop it cannot keep either
        assert stopped["stopped"] and stopped["steps"] == 1 and list(cache.iterdir()) == []


def test_a_damaged_entry_in_a_read_only_cache_is_named_and_the_run_goes_on(fitted, new_model, tokenizer, cache):
    weights, record_file = entry(cache)
    _damage("truncated", weights, record_file)
    with read_only(cache):
        model, log = new_model(), []
        record = fit_cached(model, tokenizer, log)
    assert not record["cached"] and same_head(head(model), fitted[0])
    assert any("is damaged" in line for line in log) and any("could not cache" in line for line in log)


# ---- stop and resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [1, 2, 3, 4])  # in a pass, at its end (3 batches a pass), at a held-out check
def test_a_stopped_fit_is_kept_and_resumes_to_the_head_of_an_unstopped_one(fitted, new_model, tokenizer, cache,
                                                                            tmp_path, monkeypatch, stop_at):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "other"))
    other = tmp_path / "other" / "heads"
    steps = []
    model = new_model()
    record = fit_cached(model, tokenizer, on_step=lambda s, n: steps.append((s, n)), stop=lambda: len(steps) >= stop_at)
    assert record["stopped"] and not record["cached"] and record["steps"] == stop_at and "checkpoint" not in record
    assert steps == [(s, CFG.max_steps) for s in range(1, stop_at + 1)]
    assert sorted(p.name.split(".", 1)[1] for p in other.iterdir()) == ["partial.json", "partial.safetensors"]
    assert record["history"] == [h for h in fitted[1]["history"] if h["step"] <= stop_at]

    log, steps = [], []
    torch.manual_seed(123)  # (fit_cached seeds 0 again: the resumed fit restores the generator of the stop)
    model = new_model()
    resumed = fit_cached(model, tokenizer, log, on_step=lambda s, n: steps.append(s))
    assert any(f"resumed at step {stop_at} from {other}" in line for line in log), log
    assert steps == list(range(stop_at + 1, CFG.max_steps + 1))
    assert not resumed["stopped"] and same_head(head(model), fitted[0])
    assert resumed["history"] == fitted[1]["history"] and resumed["steps"] == CFG.max_steps
    assert sorted(p.name.split(".", 1)[1] for p in other.iterdir()) == ["json", "safetensors"]  # partial gone
    assert fit_cached(new_model(), tokenizer)["cached"]


@pytest.mark.parametrize("kind", ["truncated", "garbage", "record edited", "wrong shapes, checksum matching"])
def test_a_damaged_partial_fit_is_named_and_the_fit_starts_afresh(fitted, new_model, tokenizer, tmp_path,
                                                                  monkeypatch, kind):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "other"))
    other = tmp_path / "other" / "heads"
    assert fit_cached(new_model(), tokenizer, stop=lambda: True)["stopped"]
    weights = next(other.glob("*.partial.safetensors"))
    _damage(kind, weights, weights.with_suffix(".json"))
    model, log = new_model(), []
    record = fit_cached(model, tokenizer, log)
    assert any(f"{weights} is damaged" in line for line in log) and not any("resumed" in line for line in log)
    assert not record["stopped"] and same_head(head(model), fitted[0])
