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


@pytest.fixture
def idle(studio):
    """The scheduler starts nothing: the demo's runs stay queued (their rows are what these tests need)."""
    studio.registry._draining = True
    return studio


def test_a_reloaded_page_follows_the_demo_and_a_second_demo_is_refused(idle):
    from webapp.tabs import start

    assert start.demo_reloaded(idle) == {}
    ids = start.run_demo(idle)["start.demo"]
    assert start.demo_reloaded(idle)["start.demo"] == ids
    assert "already under way" in start.run_demo(idle)["start.status"]
    assert len(idle.registry.list()) == 2  # nothing more queued


def test_the_start_tab_follows_the_demo_not_the_runs_named_like_it(idle):
    """Runs named like the demo's (a duplicate demo cancelled since, or a Train run so named) queued after it:
    the Start tab still follows the demo, and a second demo is still refused (once: they hid it)."""
    from webapp.tabs import start

    ids = start.run_demo(idle)["start.demo"]
    for kind in ids:
        idle.registry.cancel(idle.registry.submit(start.NAMES[kind], kind, ["true"]))
    assert start.demo_reloaded(idle)["start.demo"] == ids
    assert "already under way" in start.run_demo(idle)["start.status"]


def test_cancelling_one_demo_run_stops_the_demo_and_a_new_one_can_start(idle):
    """Once, the other run trained on and "Run the demo" refused ("already under way") until it was cancelled
    by hand."""
    from webapp.tabs import start, train

    ids = start.run_demo(idle)["start.demo"]
    assert "cancelled" in train.cancel_run(idle, ids["language"])["train.status"]
    assert idle.registry.get(ids["task"])["state"] == "cancelled"
    assert "stopped" in start.demo_progress(idle, ids)["start.status"]
    again = start.run_demo(idle)
    assert "queued" in again["start.status"] and not set(again["start.demo"].values()) & set(ids.values())
    assert start.demo_reloaded(idle)["start.demo"] == again["start.demo"]
    assert {r["name"] for r in idle.registry.list()} == {"demo-id-language", "demo-en-task", "demo-id-language-2",
                                                         "demo-en-task-2"}


def test_a_reloaded_page_shows_a_finished_demo_and_its_score(idle):
    """Once, a reload forgot a finished demo: an empty Start tab."""
    from webapp.tabs import predict, start

    ids = start.run_demo(idle)["start.demo"]
    with idle.registry._transaction() as db:
        db.execute("UPDATE runs SET state='done', phase='done'")
    shown = start.demo_reloaded(idle)
    assert shown["start.demo"]["finished"] and "done" in shown["start.status"] and "Score a labelled" in shown[
        "start.status"]
    assert start.demo_progress(idle, shown["start.demo"]) == {}  # nothing opens or is scored again
    key = f"target_eval_id.csv ({predict.composition(ids['language'], 1.0, 'sum')})"
    idle.registry.add_metrics(ids["task"], key, {"macro_f1": 0.933, "task_only_macro_f1": 0.9, "difference": 0.033})
    steps = start.demo_reloaded(idle)["start.steps"]
    assert "macro-F1 <b>0.933</b>; task only: <b>0.900</b>" in steps and steps.count("✔") >= 8


def test_two_sessions_pressing_run_the_demo_at_once_queue_one_demo(tmp_path, monkeypatch, launch_app):
    """Through the running app: two clients call run_demo at the same moment (both past any check before the
    runs are queued); one demo is queued, the other session is told it is under way."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    monkeypatch.setenv("DEFTX_WARMUP", "0")
    monkeypatch.setenv("DEFTX_DEFAULT_MODEL", str(make_tiny_model_dir(tmp_path / "tiny")))
    demo, studio = launch_app(tmp_path / "home")
    studio.registry._draining = True  # the rows are the point; nothing trains
    both = threading.Barrier(2, timeout=20)
    real = studio.check_base_model

    def together(*a, **kw):
        out = real(*a, **kw)
        try:
            both.wait()
        except threading.BrokenBarrierError:
            pass
        return out

    monkeypatch.setattr(studio, "check_base_model", together)
    try:
        clients = [Client(demo.local_url, verbose=False) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            said = list(pool.map(lambda c: c.predict(api_name="/run_demo")[0], clients))
        assert sorted("already under way" in s for s in said) == [False, True], said
        assert len(studio.registry.list()) == 2
    finally:
        studio.registry.shutdown(cancel_running=True)
        demo.close()


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
