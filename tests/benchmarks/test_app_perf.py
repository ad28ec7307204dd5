"""benchmarks/app_perf.py at tiny size: real `python app.py` processes on a tiny local model (no network), every
figure of its three sections measured and written to a results file (so the benchmark cannot rot); and, in
seconds, its default model and the figures it computes from measurements; and the CLI task vector it trains."""
import csv
import time

import pytest

from benchmarks import app_perf
from tiny import ASSETS, make_tiny_model_dir, make_vector

OLD = "# Benchmark results\n\n## Web app\n\nold figures\n\n## Engine core\n\nkept\n"


@pytest.mark.slow
def test_tiny_run_measures_every_section(tmp_path, capsys):
    from transformers import BertForMaskedLM, BertForSequenceClassification

    model = make_tiny_model_dir(tmp_path / "models" / "tiny")
    BertForMaskedLM.from_pretrained(model).save_pretrained(model)  # with an MLM head: no head fit before step 1
    vector = make_vector(BertForSequenceClassification.from_pretrained(model, num_labels=3),
                         base_model=str(model)).save(tmp_path / "task-vector")
    results = tmp_path / "RESULTS.md"
    results.write_text(OLD, encoding="utf-8")
    t0 = time.perf_counter()
    res = app_perf.main(["--model", str(model), "--task-vector", str(vector), "--repeats", "1", "--calls", "3",
                         "--warmup-wait", "0", "--meter-seconds", "0.2", "--results", str(results)])
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    rows = {name: (value, target, ok) for name, value, target, ok in res["rows"]}
    assert list(rows) == [
        "`python app.py` → first HTTP 200", "prediction round trip, REST API (`/gradio_api/call/predict`), 3 calls",
        "prediction round trip, gradio_client, 3 calls", "  of which model time in the app (last call)",
        "first prediction (builds + caches the composed model)", "Start → first training step (status.json step ≥ 1)"]
    assert rows["`python app.py` → first HTTP 200"][0].endswith("(median of 1; " + rows[
        "`python app.py` → first HTTP 200"][0].split(" s (")[0] + "–" + rows[
        "`python app.py` → first HTTP 200"][0].split(" s (")[0] + ")")
    for name, (value, _, _) in rows.items():
        number = float(value.split()[1] if value.startswith("p50") else value.split()[0])
        assert 0 < number < (60_000 if "ms" in value else 60), (name, value)
    assert [w for w, _, _ in res["other_cores"]] == ["startup 1", "prediction", "Start -> first step"]
    text = results.read_text(encoding="utf-8")  # the section replaced, the others kept
    assert text.startswith("# Benchmark results\n\n## Web app\n\nCommand: `python -m benchmarks.app_perf --model ")
    assert text.endswith("\n## Engine core\n\nkept\n") and "old figures" not in text
    assert res["table"] in text and res["table"] in out
    assert "Start -> first step 1/1" in out
    print(f"tiny app_perf run: {took:.1f} s")


def test_the_options_choose_the_sections_and_the_model():
    with pytest.raises(SystemExit):
        app_perf.main(["--sections", "nothing"])


def test_the_default_model_is_the_apps_offline_default():
    from deftx_engine.models.presets import preset

    assert app_perf.build_parser().parse_args([]).model == "multilingual-e5-small"
    assert app_perf.DEFAULT_MODEL == preset("cpu-demo", "task")["base_model"] == "multilingual-e5-small"


def test_figures_from_measurements():
    assert app_perf.timing_row("start", [3.0, 1.0, 2.5], 15) == ("start", "2.5 s (median of 3; 1.0–3.0)", "≤ 15 s",
                                                                 True)
    assert app_perf.timing_row("start", [16.0, 30.0], 15)[1:] == ("23.0 s (median of 2; 16.0–30.0)", "≤ 15 s", False)
    rest = [i / 1000 for i in range(20, 0, -1)]  # 20 calls of 1..20 ms, slowest first
    client = [0.05 + i / 100 for i in range(20)]  # 50..240 ms
    rows = app_perf.predict_rows({"rest": rest, "client": client, "build": 1.234, "server_ms_last": 7.6}, 20)
    # p50 / p95 by nearest rank on the sorted times: index round(q * 19) -> 10 and 18
    assert rows == [
        ("prediction round trip, REST API (`/gradio_api/call/predict`), 20 calls", "p50 11 ms, p95 19 ms",
         "p50 ≤ 100 ms", True),
        ("prediction round trip, gradio_client, 20 calls", "p50 150 ms, p95 230 ms", "p50 ≤ 100 ms", False),
        ("  of which model time in the app (last call)", "8 ms", "", None),
        ("first prediction (builds + caches the composed model)", "1.2 s", "", None)]
    lines = app_perf.table(rows).splitlines()
    assert lines[:2] == ["| figure | value | target | met |", "| --- | --- | --- | --- |"] and len(lines) == 6
    assert lines[2].endswith("| p50 11 ms, p95 19 ms | p50 ≤ 100 ms | yes |")
    assert lines[3].endswith("| p50 150 ms, p95 230 ms | p50 ≤ 100 ms | no |")
    assert lines[5] == "| first prediction (builds + caches the composed model) | 1.2 s |  |  |"


@pytest.mark.slow
def test_the_cli_task_vector_it_predicts_with(tmp_path, monkeypatch):
    """Section 2 without --task-vector trains its vector through the CLI: 3 + 3 steps, k 5 %, on --model (a
    subprocess that imports the engine: slow on a loaded machine, so marked slow)."""
    from deftx_engine.method.params import parameter_roles
    from deftx_engine.method.vectors import SparseVector
    from deftx_engine.models.loading import load_cls_model

    model = make_tiny_model_dir(tmp_path / "tiny")
    monkeypatch.setitem(app_perf.SETUP, "model", str(model))
    vec = SparseVector.load(app_perf.make_task_vector(tmp_path / "home"))
    with (ASSETS / "source_task_en.csv").open(encoding="utf-8") as f:
        labels = sorted({row["label"] for row in csv.DictReader(f)})
    assert (vec.meta.kind, vec.meta.base_model, vec.meta.language, vec.meta.label_names) == (
        "task", str(model), "en", labels)
    cls = load_cls_model(str(model), labels)
    maskable = sum(p.numel() for n, p in cls.named_parameters() if n in parameter_roles(cls).maskable)
    assert vec.nnz == vec.meta.k == round(0.05 * maskable)
    assert vec.meta.train["full_steps"] == vec.meta.train["sparse_steps"] == 3
