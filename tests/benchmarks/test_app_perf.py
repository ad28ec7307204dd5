"""benchmarks/app_perf.py at tiny size: real `python app.py` processes on a tiny local model (no network), every
figure of its three sections measured and written to a results file (so the benchmark cannot rot)."""
import time

import pytest

from benchmarks import app_perf
from tiny import make_tiny_model_dir, make_vector

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
