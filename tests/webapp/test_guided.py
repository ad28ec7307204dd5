"""The guided first run and what the app shows about transfer (issues 10 and 12), through the handlers.

The demo runs the cpu-demo preset on DEFTX_DEFAULT_MODEL, pinned here to a tiny random BERT (tests/tiny.py), so
the suite never builds multilingual-e5-small: Run the demo -> both runs done -> Predict with both vectors and
the example file scored beside the task vector alone; then the composition controls, the source-language
picker and the held-out evidence. The progress panel's following of the queue runs on sleeping processes.
"""
import sys
import time

import pytest

from tiny import ASSETS, make_tiny_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore:the source-language vector:UserWarning")]  # gr.Warning, no page


@pytest.fixture
def studio(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFTX_WARMUP", "0")
    monkeypatch.setenv("DEFTX_DEFAULT_MODEL", str(make_tiny_model_dir(tmp_path / "tiny")))
    from webapp.state import Studio

    s = Studio(tmp_path / "home").start()
    yield s
    s.registry.shutdown(cancel_running=True)


def sleeper(studio, name: str) -> str:
    return studio.registry.submit(name, "language", [sys.executable, "-c", "import time; time.sleep(60)"])


def wait_state(studio, run_id: str, state: str, timeout: float = 20) -> None:
    end = time.time() + timeout
    while studio.registry.get(run_id)["state"] != state:
        assert time.time() < end, f"{run_id} never became {state}: {studio.registry.get(run_id)}"
        time.sleep(0.1)


def test_progress_panel_shows_the_running_run_and_the_queue_and_follows_it(studio):
    from webapp.tabs import runs

    first = sleeper(studio, "first-run")
    wait_state(studio, first, "running")
    second = sleeper(studio, "second-run")
    panel = studio.progress(studio.registry.get(first))
    assert "first-run" in panel and "second-run" in panel and "#1 in the queue" in panel
    shown = runs.poll(studio, first, "", "")
    assert "second-run" in shown["train.progress"]  # the queued run is listed below the running one
    studio.registry.cancel(first)
    wait_state(studio, second, "running")
    followed = runs.poll(studio, first, shown["runs.watch_sig"], shown["runs.runs_sig"])
    assert followed["train.watch"]["value"] == second  # the panel moves on to the run that started
    assert "running" in followed["train.progress"] and "second-run" in followed["train.progress"]


def test_a_reloaded_page_follows_the_demo_and_a_second_demo_is_refused(studio):
    from webapp.tabs import start

    assert start.demo_reloaded(studio) == {}
    ids = {kind: sleeper(studio, start.NAMES[kind]) for kind in ("language", "task")}
    assert start.demo_reloaded(studio)["start.demo"] == ids
    assert "already under way" in start.run_demo(studio)["start.status"]
    assert len(studio.registry.list()) == 2  # nothing more queued


def test_evidence_and_side_by_side_say_when_a_language_vector_hurts():
    from webapp.render import evidence_html, heldout_short
    from webapp.tabs.predict import side_by_side

    worse = {"lines": 40, "theta0": {"loss": 6.0, "accuracy": 0.1}, "theta0+phi": {"loss": 6.2, "accuracy": 0.1},
             "encoder_only": {"loss": 6.3, "accuracy": 0.1}}
    assert heldout_short(worse).startswith("NO:") and "not lower" in heldout_short(worse)
    assert "did NOT lower" in evidence_html(False, "x")
    assert heldout_short(None) == ""
    text = side_by_side({"macro_f1": 0.70}, {"macro_f1": 0.80})
    assert "task only: **0.800**" in text and "-0.100" in text and "COSTS 0.100" in text


def test_guided_demo_then_composition_controls_and_source_language_vector(studio, api):
    from webapp.tabs import predict, start, train

    out = start.run_demo(studio)
    demo = out["start.demo"]
    assert set(demo) == {"language", "task"}, out
    configs = {k: studio.registry.get(v)["config"] for k, v in demo.items()}
    assert configs["language"]["base_model"] == configs["task"]["base_model"]  # DEFTX_DEFAULT_MODEL, not e5
    assert configs["language"]["full_steps"] == 60 and configs["task"]["full_epochs"] == 2  # the cpu-demo preset
    end = time.time() + 600
    while True:
        tick = start.demo_progress(studio, demo)
        if tick.get("start.demo", {}).get("finished"):
            break
        assert time.time() < end, tick
        time.sleep(1)
    assert tick["app.tabs"].selected == "predict", tick["start.status"]
    assert tick["predict.task"]["value"] == demo["task"] and tick["predict.lang"]["value"] == demo["language"]
    steps = tick["start.steps"]
    assert steps.count("✔") >= 7 and "held-out masked-token loss" in steps  # every sub-step, the evidence
    scored = start.score_demo(studio, tick["start.demo"])
    status = scored["predict.file_status"]
    assert "with the language vector: macro-F1" in status and "task only:" in status and "difference" in status
    metrics = studio.registry.get(demo["task"])["config"]["metrics"]
    both = metrics["target_eval_id.csv (task + language vector, sum, scale 1)"]
    assert both["merge"] == "sum" and both["language_scale"] == 1.0
    assert both["difference"] == pytest.approx(both["macro_f1"] - both["task_only_macro_f1"], abs=2e-4)
    assert "target_eval_id.csv (task vector alone)" in metrics

    fns = api(studio)  # the API: scale and TIES reach the composed model and the recorded evaluation
    ties = fns["evaluate"](demo["task"], demo["language"], None, str(ASSETS / "target_eval_id.csv"), "", "",
                           "label", 1.0, "ties")
    assert "TIES" in ties[0] and "task only:" in ties[0]
    assert "target_eval_id.csv (task + language vector, TIES)" in studio.registry.get(demo["language"])["config"][
        "metrics"]
    label = fns["predict"](demo["task"], demo["language"], "Pelayanannya ramah dan cepat.", "", 0.5, "sum")[0]
    assert "%" in label

    table = studio.runs_table()
    assert table.loc[table["run"] == demo["language"], "learned its language?"].iloc[0].startswith(("yes:", "NO:"))
    assert "held-out masked-token loss" in studio.progress(studio.registry.get(demo["language"]))

    picker = train.source_choices(studio, "task", configs["task"]["base_model"], "")["train.srclang"]
    assert picker["visible"] and demo["language"] in [v for _, v in picker["choices"]]
    assert not train.source_choices(studio, "task", "minilm", "")["train.srclang"]["choices"][1:]
    args = dict(kind="task", base_model=configs["task"]["base_model"], data=str(ASSETS / "source_task_en.csv"),
                language="en", name="on-source", method="deftx", rank_policy="energy", energy=0.9, rank=100,
                residual_share=0.05, k_percent=5, full_steps=1, sparse_steps=1, epochs=1, lr=1e-3, batch_size=8,
                max_length=32, seed=1, text_column="", pair_column="", label_column="label", preset="custom",
                k_exact_value=None)
    refused = train.start_training(studio, **{**args, "base_model": "minilm"}, source_language_vector=demo["language"])
    assert "trained on" in refused["train.status"] and "train.run_id" not in refused
    queued = train.start_training(studio, **args, source_language_vector=demo["language"])
    row = studio.registry.get(queued["train.run_id"])
    assert row["config"]["source_language_vector"] == studio.registry.get(demo["language"])["vector_dir"]
    studio.registry.cancel(row["id"])
    assert predict.composition(None, 0.5, "ties") == "task vector alone"
