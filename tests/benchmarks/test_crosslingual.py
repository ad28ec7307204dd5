"""benchmarks/crosslingual.py on a tiny model and tiny NusaX-shaped data."""
import csv
import importlib
import json
from pathlib import Path

import pytest

from deftx_engine.method.vectors import SparseVector
from tiny import ASSETS, make_tiny_model_dir


def load_bench():
    return importlib.import_module("benchmarks.crosslingual")


# ---- the benchmark end to end ----------------------------------------------------------------------------
def write_nusax(root: Path) -> Path:
    """A NusaX-shaped folder from the example files: 3 'languages' share the example sentences."""
    rows = list(csv.DictReader((ASSETS / "source_task_en.csv").open(encoding="utf-8")))
    labels = sorted({r["label"] for r in rows})
    text = (ASSETS / "target_corpus_id.txt").read_text(encoding="utf-8")
    corpus = [l.strip() for l in text.splitlines() if l.strip()]
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
    assert list(summary) == [m for m in bench.METHODS if m not in bench.SRC_VARIANTS]  # src methods: opt-in
    # one seed: 6 task variants + full-ft, and 6 language variants for the target
    assert len(result["runs"]) == 7 + 6
    assert len(result["evaluations"]) == len(summary) * 2  # source + target per method
    for name, row in summary.items():
        assert row["n_seeds"] == 1
        assert 0 <= row["average"][0] <= 100 and row["average"][1] == 0.0
        assert set(row["targets"]) == {"javanese"}
        assert ("overlap_jaccard" in row) == (bench.METHODS[name].lang is not None)
        assert row["train_seconds"] > 0
    # how much of each method's masks LT-SFT's masks also have: not for LT-SFT itself or the dense fine-tune
    for name in ("deftx", "deftx-matrix", "deftx-drop-residual", "deftx-fixed-rank", "ties"):
        for share in ("task_mask_in_lt_sft", "lang_mask_in_lt_sft"):
            assert 0 <= summary[name][share][0] <= 100
    assert "task_mask_in_lt_sft" in summary["task-only"] and "lang_mask_in_lt_sft" not in summary["task-only"]
    assert not {"task_mask_in_lt_sft", "lang_mask_in_lt_sft"} & (set(summary["lt-sft"]) | set(summary["full-ft"]))
    # task-only and deftx share the task vector: same source F1 per seed
    ev = {(e["method"], e["seed"], e["where"]): e["macro_f1"] for e in result["evaluations"]}
    assert ev[("task-only", 1, "source")] == ev[("deftx", 1, "source")]
    # the no-retrain ablation really skipped the sparse phase; checkpoints were cleaned up
    nr = [r for r in result["runs"] if r["variant"] == "no-retrain"]
    assert all(r["steps"] == 2 for r in nr)
    assert not list((tmp_path / "work").rglob("checkpoint-*"))
    # one phase 1 per kind (and target): the first variant trains it, the other five read it
    assert len(list((tmp_path / "work" / "tiny" / "phase1").glob("*.safetensors"))) == 2
    # the mask anatomy of the same runs, from the same command line (nothing trained)
    anatomy = importlib.import_module("benchmarks.mask_anatomy").main(argv)
    vec = lambda v, k: SparseVector.load(next(r["folder"] for r in result["runs"]  # noqa: E731
                                              if r["variant"] == v and r["kind"] == k) + "/vector")
    from deftx_engine.method.masks import overlap

    where, lang = anatomy["where"]["deftx language"], vec("deftx", "language")
    assert sum(where[g][0] for g in ("embeddings", "attention", "ffn", "other")) == pytest.approx(1.0)
    emb = sum(i.numel() for n, i in lang.indices.items() if "embeddings" in n)
    assert where["embeddings"] == [emb / lang.nnz]
    lt = anatomy["in_lt_sft"]["deftx-matrix language"]
    assert 0 <= lt["overall"][0] <= 1 and "lt-sft language" not in anatomy["in_lt_sft"]
    lang_task = anatomy["language_task"]["deftx"]
    assert lang_task["overall"] == [overlap(vec("deftx", "language").mask(), vec("deftx", "task").mask())
                                    ["overall"]["share_of_a"]]
    assert "| deftx language |" in (tmp_path / "work" / "tiny" / "anatomy.md").read_text()
    logs = [(Path(r["folder"]) / "log.txt").read_text() for r in result["runs"] if r["kind"] != "full-ft"]
    assert sum("phase 1 reused" in log for log in logs) == 2 * 5
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


@pytest.mark.slow
def test_source_language_protocol(tmp_path):
    """deftx-src: a source-language vector first, the task SFT on top of it, the target's vector composed."""
    bench = load_bench()
    model = make_tiny_model_dir(tmp_path / "tiny")
    data = write_nusax(tmp_path / "nusax")
    result = bench.main(["--data", str(data), "--model", str(model), "--targets", "javanese", "--seeds", "1",
                         "--methods", "task-only", "deftx-src", "--task-steps", "2", "--lang-steps", "2",
                         "--batch-size", "4", "--max-length", "24", "--no-calibrate",
                         "--work-dir", str(tmp_path / "work")])
    runs = {(r["kind"], r["variant"], r["target"]): r for r in result["runs"]}
    assert set(runs) == {("task", "deftx", None), ("language", "deftx", "indonesian"), ("task", "deftx-src", None),
                         ("language", "deftx", "javanese")}
    src_task = json.loads((Path(runs[("task", "deftx-src", None)]["folder"]) / "run.json").read_text())
    assert src_task["source_language_vector"] == str(Path(runs[("language", "deftx", "indonesian")]["folder"])
                                                     / "vector")
    assert 0 <= result["summary"]["deftx-src"]["average"][0] <= 100
    report = next((tmp_path / "work").rglob("results.md")).read_text(encoding="utf-8")
    assert "no time estimate: nothing left to train, or --no-calibrate" in report and "expected 0.0 min" not in report


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
    assert result["jobs"] == 3 * 7 + 3 * 3 * 6 and result["todo"] == result["jobs"]


def test_lang_groups_change_only_the_language_runs_and_keep_old_keys(tmp_path):
    """--lang-groups makes new language runs; at 'all' the run folders are the ones cached before the option."""
    bench = load_bench()
    data = write_nusax(tmp_path / "nusax")
    paths = bench.nusax_paths(data, "indonesian", ["javanese"])
    argv = ["--data", str(data), "--targets", "javanese", "--seeds", "1", "--methods", "deftx", "--dry-run",
            "--no-calibrate", "--work-dir", str(tmp_path / "w")]
    s = bench.build_parser().parse_args(argv)
    settings = bench.Settings(**{f: getattr(s, f, None) for f in bench.Settings.__dataclass_fields__
                                 if f not in ("seeds", "head_corpus")}, seeds=[1], head_corpus=None)
    folders = {}
    for groups in ("all", "embeddings"):
        settings.lang_groups = groups
        folders[groups] = {(j.kind, j.target): j.folder for j in bench.plan_jobs(settings, paths, tmp_path)}
    assert folders["all"][("task", None)] == folders["embeddings"][("task", None)]
    assert folders["all"][("language", "javanese")] != folders["embeddings"][("language", "javanese")]
    cfg = bench.lang_config(settings, "deftx", 1, "javanese", paths)
    assert cfg.param_groups == "embeddings"
    settings.lang_groups = "all"
    old = {k: v for k, v in bench.lang_config(settings, "deftx", 1, "javanese", paths).to_dict().items()
           if k not in ("param_groups", "precision", "compile")}  # fields an older version did not record
    assert folders["all"][("language", "javanese")].name == f"seed1-{bench._hash(old)}"
