"""benchmarks/crosslingual.py on a tiny model and tiny NusaX-shaped data, and the TIES merge on hand-made vectors."""
import csv
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from deftx_engine.errors import VectorError
from deftx_engine.vectors import SparseVector, VectorMeta, compose
from tiny import ASSETS, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ties import ties_merge, trim  # noqa: E402


def load_bench():
    return importlib.import_module("benchmarks.crosslingual")


# ---- TIES -------------------------------------------------------------------------------------------------
def vec(kind, entries, shapes=None, heads=None, fp="fp"):
    """entries: {param: {flat index: value}}"""
    shapes = shapes or {"w": (2, 5), "b": (5,)}
    v = SparseVector(VectorMeta(kind=kind, base_model="m", base_fingerprint=fp, language=kind[:4],
                                label_names=["a", "b"] if kind == "task" else []))
    for name, d in entries.items():
        idx = sorted(d)
        v.indices[name] = torch.tensor(idx, dtype=torch.int32)
        v.values[name] = torch.tensor([d[i] for i in idx], dtype=torch.float32)
        v.shapes[name] = shapes[name]
    for name, t in (heads or {}).items():
        v.heads[name] = t
        v.shapes[name] = tuple(t.shape)
    v.check()
    return v


def as_dict(v):
    return {n: dict(zip(v.indices[n].tolist(), [round(x, 6) for x in v.values[n].tolist()])) for n in v.indices}


def test_trim_keeps_the_top_share_of_each_vector_globally():
    v = vec("task", {"w": {0: 0.1, 3: -5.0, 7: 0.2, 9: 1.0}, "b": {1: -3.0, 4: 0.05}})
    kept = trim(v, 0.5)  # 3 of 6 entries: -5, -3, 1
    assert {n: (i.tolist(), t.tolist()) for n, (i, t) in kept.items()} == {"w": ([3, 9], [-5.0, 1.0]),
                                                                              "b": ([1], [-3.0])}
    with pytest.raises(VectorError):
        trim(v, 0.0)


def test_ties_elects_sign_by_mass_and_averages_the_agreeing_values():
    # entry w[0]: +2 (task) and -1 (lang): mass +1 -> only +2 agrees -> 2.0 (a sum would give 1.0)
    # entry w[1]: +1 and +3 -> both agree -> mean 2.0 (a sum would give 4.0)
    # entry w[2]: -4 (task only) -> -4; entry b[0]: +0.5 (lang only) -> 0.5
    # entry w[3]: +1 and -1: mass exactly 0 -> dropped
    task = vec("task", {"w": {0: 2.0, 1: 1.0, 2: -4.0, 3: 1.0}}, heads={"classifier.weight": torch.ones(2, 5)})
    lang = vec("language", {"w": {0: -1.0, 1: 3.0, 3: -1.0}, "b": {0: 0.5}})
    merged = ties_merge([task, lang], density=1.0)
    assert as_dict(merged) == {"w": {0: 2.0, 1: 2.0, 2: -4.0}, "b": {0: 0.5}}
    assert merged.meta.kind == "task" and merged.meta.label_names == ["a", "b"]
    assert torch.equal(merged.heads["classifier.weight"], torch.ones(2, 5))
    assert merged.meta.method == "ties" and merged.nnz == merged.meta.k == 4
    merged.check()
    # lambda scales everything; trimming happens before the election
    assert as_dict(ties_merge([task, lang], density=1.0, lam=0.5))["w"] == {0: 1.0, 1: 1.0, 2: -2.0}
    trimmed = ties_merge([task, lang], density=0.5)  # task keeps -4, 2; lang keeps 3, -1 (first of the ties)
    assert as_dict(trimmed) == {"w": {0: 2.0, 1: 3.0, 2: -4.0}}


def test_ties_on_disjoint_untrimmed_vectors_equals_the_sum():
    task = vec("task", {"w": {0: 1.0, 5: -2.0}})
    lang = vec("language", {"w": {1: 0.5}, "b": {2: -0.25}})
    assert as_dict(ties_merge([task, lang], density=1.0)) == as_dict(compose([task, lang]))


def test_ties_refuses_mixed_base_models_and_two_task_vectors():
    a = vec("task", {"w": {0: 1.0}})
    with pytest.raises(VectorError):
        ties_merge([a, vec("language", {"w": {0: 1.0}}, fp="other")])
    with pytest.raises(VectorError):
        ties_merge([a, vec("task", {"w": {1: 1.0}})])
    with pytest.raises(VectorError):
        ties_merge([])


# ---- the benchmark end to end ----------------------------------------------------------------------------
def write_nusax(root: Path) -> Path:
    """A NusaX-shaped folder from the example files: 3 'languages' share the example sentences."""
    rows = list(csv.DictReader((ASSETS / "source_task_en.csv").open(encoding="utf-8")))
    labels = sorted({r["label"] for r in rows})
    corpus = [l.strip() for l in (ASSETS / "target_corpus_id.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    for lang in ("indonesian", "javanese", "sundanese"):
        d = root / "sentiment" / lang
        d.mkdir(parents=True)
        for split, part in (("train", rows), ("test", rows[: max(len(labels) * 2, 12)])):
            with (d / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["id", "text", "label"])
                w.writerows([i, r["text"], r["label"]] for i, r in enumerate(part))
    (root / "mt").mkdir()
    with (root / "mt" / "train.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "indonesian", "javanese", "sundanese"])
        w.writerows([i, line, line, line] for i, line in enumerate(corpus[:40]))
    return root


@pytest.mark.slow
def test_tiny_run_end_to_end_and_cached_rerun(tmp_path, capsys):
    bench = load_bench()
    model = make_tiny_model_dir(tmp_path / "tiny")
    data = write_nusax(tmp_path / "nusax")
    argv = ["--data", str(data), "--model", str(model), "--targets", "javanese", "--seeds", "1",
            "--task-steps", "2", "--lang-steps", "2", "--batch-size", "4", "--max-length", "24",
            "--fixed-rank", "4", "--work-dir", str(tmp_path / "work")]
    result = bench.main(argv)
    out = capsys.readouterr().out
    assert "expected time:" in out
    summary = result["summary"]
    assert list(summary) == list(bench.METHODS)
    # one seed: 5 task variants + full-ft, and 5 language variants for the target
    assert len(result["runs"]) == 6 + 5
    assert len(result["evaluations"]) == len(bench.METHODS) * 2  # source + target per method
    for name, row in summary.items():
        assert row["n_seeds"] == 1
        assert 0 <= row["average"][0] <= 100 and row["average"][1] == 0.0
        assert set(row["targets"]) == {"javanese"}
        assert ("overlap_jaccard" in row) == (bench.METHODS[name].lang is not None)
        assert row["train_seconds"] > 0
    # how much of each method's masks LT-SFT's masks also have: not for LT-SFT itself or the dense fine-tune
    for name in ("deftx", "deftx-drop-residual", "deftx-fixed-rank", "ties"):
        assert 0 <= summary[name]["task_mask_in_lt_sft"][0] <= 100 and 0 <= summary[name]["lang_mask_in_lt_sft"][0] <= 100
    assert "task_mask_in_lt_sft" in summary["task-only"] and "lang_mask_in_lt_sft" not in summary["task-only"]
    assert not {"task_mask_in_lt_sft", "lang_mask_in_lt_sft"} & (set(summary["lt-sft"]) | set(summary["full-ft"]))
    # task-only and deftx share the task vector: same source F1 per seed
    ev = {(e["method"], e["seed"], e["where"]): e["macro_f1"] for e in result["evaluations"]}
    assert ev[("task-only", 1, "source")] == ev[("deftx", 1, "source")]
    # the no-retrain ablation really skipped the sparse phase; checkpoints were cleaned up
    nr = [r for r in result["runs"] if r["variant"] == "no-retrain"]
    assert all(r["steps"] == 2 for r in nr)
    assert not list((tmp_path / "work").rglob("checkpoint-*"))
    prefix = tmp_path / "work" / "tiny" / "results"
    saved = json.loads(prefix.with_suffix(".json").read_text())
    assert saved["summary"]["deftx"]["average"] == list(summary["deftx"]["average"])
    md = prefix.with_suffix(".md").read_text()
    assert "| deftx | " in md and "| ties | " in md and "javanese" in md
    assert "plotly" in prefix.with_suffix(".html").read_text()[:20000].lower()

    # a re-run trains nothing and evaluates nothing new
    again = bench.main(argv)
    assert again["meta"]["trained"] == 0
    assert all(e["cached"] for e in again["evaluations"])
    assert again["summary"]["deftx"]["average"] == summary["deftx"]["average"]
    assert "expected time" not in capsys.readouterr().out  # nothing to do: no calibration


def test_missing_language_is_a_clear_error(tmp_path):
    bench = load_bench()
    data = write_nusax(tmp_path / "nusax")
    with pytest.raises(SystemExit, match=r"balinese.*missing.*indonesian, javanese, sundanese"):
        bench.main(["--data", str(data), "--targets", "balinese", "--dry-run"])
    with pytest.raises(SystemExit, match="no column 'javanese'"):
        (data / "mt" / "train.csv").write_text(",indonesian\n0,x\n", encoding="utf-8")
        bench.main(["--data", str(data), "--targets", "javanese", "--dry-run"])
    with pytest.raises(SystemExit, match="not found"):
        bench.main(["--data", str(tmp_path / "nowhere"), "--dry-run"])


def test_default_configuration_plan_on_nusax(nusax_dir, tmp_path):
    """The default command's plan on the real data: 18 task runs + 45 language runs, all on disk paths."""
    bench = load_bench()
    result = bench.main(["--data", str(nusax_dir), "--dry-run", "--no-calibrate", "--work-dir", str(tmp_path)])
    assert result["jobs"] == 3 * 6 + 3 * 3 * 5 and result["todo"] == result["jobs"]
