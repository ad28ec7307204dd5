"""benchmarks/research/lang_parts.py: the restriction of a vector to a part, the tables, and a run on a tiny model."""
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from deftx_engine.method.vectors import SparseVector, VectorMeta
from tiny import make_tiny_model_dir

NAMES = {  # parameter -> (group, layer or None)
    "bert.embeddings.word_embeddings.weight": ("embeddings", None),
    "bert.encoder.layer.0.attention.self.query.weight": ("attention", 0),
    "bert.encoder.layer.0.attention.output.dense.weight": ("attention", 0),
    "bert.encoder.layer.1.intermediate.dense.weight": ("ffn", 1),
    "bert.encoder.layer.3.output.dense.bias": ("ffn", 3),
    "bert.encoder.layer.2.attention.self.value.bias": ("attention", 2),
    "bert.something.weight": ("other", None),
}


def load():
    return importlib.import_module("benchmarks.research.lang_parts")


def write_nusax(root: Path) -> Path:
    """The NusaX-shaped folder of test_crosslingual.py (tests/benchmarks is no package: loaded by path)."""
    path = Path(__file__).parents[1] / "test_crosslingual.py"
    spec = importlib.util.spec_from_file_location("_test_crosslingual", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_nusax(root)


def hand_vector() -> SparseVector:
    """Parameter i holds i + 1 entries (so every part has a distinct size), plus a head."""
    meta = VectorMeta(kind="language", base_model="tiny", base_fingerprint="x", language="jv",
                      extra={"train": {"seed": 1}})
    vec = SparseVector(meta)
    for i, name in enumerate(NAMES):
        vec.indices[name] = torch.arange(i + 1, dtype=torch.int32)
        vec.values[name] = torch.full((i + 1,), float(i))
        vec.shapes[name] = (10,)
    vec.heads["cls.bias"] = torch.zeros(3)
    vec.shapes["cls.bias"] = (3,)
    vec.meta.k = vec.nnz
    return vec


def test_restrict_vector_keeps_the_entries_of_one_part():
    lp = load()
    vec = hand_vector()
    before = {n: (i.clone(), vec.values[n].clone()) for n, i in vec.indices.items()}
    for part in lp.CHOICES:
        sub = lp.restrict_vector(vec, part, n_layers=4)
        want = [n for n, (g, layer) in NAMES.items() if part == "all" or g == part
                or (part == "lower" and layer is not None and layer < 2)
                or (part == "upper" and layer is not None and layer >= 2)]
        assert list(sub.indices) == want, part
        for n in want:
            assert torch.equal(sub.indices[n], vec.indices[n]) and torch.equal(sub.values[n], vec.values[n])
        assert sub.heads.keys() == vec.heads.keys() and set(sub.shapes) == {*want, "cls.bias"}
        assert sub.meta.k == sub.nnz and sub.meta.extra["part"] == part and sub.meta.language == "jv"
        sub.check()  # a consistent vector
    # the original is untouched
    assert vec.meta.k == vec.nnz == 28 and "part" not in vec.meta.extra and list(vec.indices) == list(NAMES)
    assert all(torch.equal(vec.indices[n], i) and torch.equal(vec.values[n], v) for n, (i, v) in before.items())
    with pytest.raises(ValueError, match="unknown part"):
        lp.restrict_vector(vec, "pooler", 4)


def test_part_shares():
    lp = load()
    sh = lp.part_shares(hand_vector(), lp.CHOICES, n_layers=4)
    assert sh["embeddings"] == pytest.approx(1 / 28) and sh["attention"] == pytest.approx((2 + 3 + 6) / 28)
    assert sh["ffn"] == pytest.approx((4 + 5) / 28) and sh["other"] == pytest.approx(7 / 28)
    assert sum(sh[g] for g in lp.GROUPS) == pytest.approx(1.0)
    assert sh["lower"] == pytest.approx((2 + 3 + 4) / 28) and sh["upper"] == pytest.approx((5 + 6) / 28)
    assert sh["all"] == 1.0 and sh["none"] == 0.0


def test_layer_count_falls_back_to_the_names(tmp_path):
    lp = load()
    assert lp.layer_count(str(tmp_path / "no-such-model"), list(NAMES)) == 4
    assert lp.layer_count(str(make_tiny_model_dir(tmp_path / "m")), list(NAMES)) == 2  # from the config


def test_score_table():
    lp = load()
    rows = {"none": {"a": 70.0, "b": 60.0}, "x": {"a": 60.0, "b": 55.0}, "half": {"a": 50.0}}
    md = lp.score_table(rows, ["a", "b"], rows["none"], "part", {"x": "12.5"}, "share %")
    lines = md.splitlines()
    assert lines[0] == "| part | share % | a | b | avg | Δ avg vs none |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| none | – | 70.0 | 60.0 | **65.0** | +0.0 |"
    assert lines[3] == "| x | 12.5 | 60.0 | 55.0 | **57.5** | -7.5 |"
    assert lines[4] == "| half | – | 50.0 | – | **–** | – |"


def test_missing_files_are_clear_errors(tmp_path):
    lp = load()
    with pytest.raises(SystemExit, match="nothing.json: results file not found"):
        lp.main(["--results", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "p")])
    res = {"settings": {"source": "indonesian", "targets": ["javanese"]},
           "runs": [{"kind": "task", "variant": "deftx", "seed": 1, "target": None, "folder": str(tmp_path / "t")}]}
    (tmp_path / "r.json").write_text(json.dumps(res))
    (tmp_path / "sentiment" / "javanese").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"javanese/test\.csv: test file"):
        lp.main(["--results", str(tmp_path / "r.json"), "--data", str(tmp_path), "--out", str(tmp_path / "p")])
    (tmp_path / "sentiment" / "javanese" / "test.csv").write_text("text,label\nx,positive\n")
    with pytest.raises(SystemExit, match=r"t/vector: vector folder not found \(run task deftx seed 1 of .*r\.json"):
        lp.main(["--results", str(tmp_path / "r.json"), "--data", str(tmp_path), "--out", str(tmp_path / "p")])


@pytest.mark.slow
def test_tiny_run_reproduces_the_benchmark_and_resumes(tmp_path, capsys):
    bench = importlib.import_module("benchmarks.crosslingual")
    lp = load()
    model = make_tiny_model_dir(tmp_path / "tiny")
    data = write_nusax(tmp_path / "nusax")
    targets = ["javanese", "sundanese"]
    ref = bench.main(["--data", str(data), "--model", str(model), "--targets", *targets, "--seeds", "1",
                      "--methods", "task-only", "deftx", "deftx-src", "--task-steps", "2", "--lang-steps", "2",
                      "--batch-size", "4", "--max-length", "24", "--no-calibrate",
                      "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "bench")])
    f1 = {(e["method"], e["where"]): 100 * e["macro_f1"] for e in ref["evaluations"]}
    prefix = tmp_path / "parts"
    argv = ["--results", str(tmp_path / "bench.json"), "--data", str(data), "--out", str(prefix),
            "--arith-scales", "1", "0.5"]
    capsys.readouterr()
    result = lp.main(argv)
    parts = result["parts"]
    assert list(parts) == ["none", *[p for p in lp.PARTS if p != "none"]]
    assert result["settings"]["n_layers"] == 2
    for t in targets:  # the same models as the benchmark's: the same scores, exactly
        assert parts["all"]["targets"][t] == f1[("deftx", t)]
        assert parts["none"]["targets"][t] == f1[("task-only", t)]
        sh = result["shares"][t]
        assert sum(sh[g] for g in lp.GROUPS) == pytest.approx(1.0) and sh["all"] == 1.0
        assert parts["lower"]["share"][t] + parts["upper"]["share"][t] + sh["embeddings"] + sh["other"] \
            == pytest.approx(1.0)
    assert parts["none"]["delta_vs_none"] == 0.0
    ar = result["arithmetic"]
    assert list(ar["scales"]) == ["1", "0.5"] and ar["source_results"] is None
    assert ar["source_vector"].split("/language/")[1].startswith("indonesian/deftx/")
    assert all(set(r["targets"]) == set(targets) for r in ar["scales"].values())
    assert result["meta"]["evaluated"] == len(targets) * (len(lp.PARTS) + 2) and result["meta"]["cached"] == 0
    md = (tmp_path / "parts.md").read_text()
    assert "| part | entries of φ_lang % (mean over targets) | javanese | sundanese | avg | Δ avg vs none |" in md
    assert "| s = 1 |" in md and "| s = 0.5 |" in md and "| none (task only) |" in md
    saved = json.loads((tmp_path / "parts.json").read_text())
    assert saved["parts"]["all"]["avg"] == pytest.approx(parts["all"]["avg"])

    # a rerun evaluates nothing new and gives the same numbers
    again = lp.main(argv)
    assert again["meta"]["evaluated"] == 0 and again["meta"]["cached"] == result["meta"]["evaluated"]
    assert again["parts"] == parts and again["arithmetic"] == ar

    # without a source vector the arithmetic is skipped with a note; the parts come from the cache
    res = json.loads((tmp_path / "bench.json").read_text())
    res["runs"] = [r for r in res["runs"] if r["target"] != "indonesian"]
    (tmp_path / "no-src.json").write_text(json.dumps(res))
    capsys.readouterr()
    third = lp.main(["--results", str(tmp_path / "no-src.json"), "--data", str(data), "--out", str(prefix),
                     "--parts", "all"])
    assert "language arithmetic skipped" in capsys.readouterr().out
    assert "skipped" in third["arithmetic"] and third["meta"]["evaluated"] == 0
    assert list(third["parts"]) == ["none", "all"]
    # ... unless --source-results names a file that has it
    fourth = lp.main(["--results", str(tmp_path / "no-src.json"), "--source-results", str(tmp_path / "bench.json"),
                      "--data", str(data), "--out", str(prefix), "--parts", "all", "--arith-scales", "1"])
    assert fourth["meta"]["evaluated"] == 0 and fourth["arithmetic"]["scales"]["1"] == ar["scales"]["1"]
    assert fourth["arithmetic"]["source_results"] == str(tmp_path / "bench.json")


def test_parts_are_scored_in_the_benchmarks_precision(tmp_path, monkeypatch):
    """A bf16 benchmark's parts are scored in bf16 too (auto would follow the CPU), so "all" and "none" reproduce
    its scores."""
    bench = importlib.import_module("benchmarks.crosslingual")
    lp = load()
    model, data = make_tiny_model_dir(tmp_path / "tiny"), write_nusax(tmp_path / "nusax")
    ref = bench.main(["--data", str(data), "--model", str(model), "--targets", "javanese", "--seeds", "1",
                      "--methods", "task-only", "deftx", "--task-steps", "2", "--lang-steps", "2", "--batch-size", "4",
                      "--max-length", "24", "--no-calibrate", "--precision", "bf16", "--work-dir",
                      str(tmp_path / "work"), "--out", str(tmp_path / "bench")])
    f1 = {(e["method"], e["where"]): 100 * e["macro_f1"] for e in ref["evaluations"]}
    import deftx_engine.outputs.inference as inference

    seen, real = [], inference.evaluate_task_data
    monkeypatch.setattr(inference, "evaluate_task_data",
                        lambda *a, **k: seen.append(k.get("precision")) or real(*a, **k))
    result = lp.main(["--results", str(tmp_path / "bench.json"), "--data", str(data), "--out", str(tmp_path / "parts"),
                      "--parts", "all"])
    assert seen and set(seen) == {"bf16"}
    assert result["parts"]["all"]["targets"]["javanese"] == f1[("deftx", "javanese")]
    assert result["parts"]["none"]["targets"]["javanese"] == f1[("task-only", "javanese")]
