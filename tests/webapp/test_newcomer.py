"""Defects a newcomer met (issue 12), through the app's handlers on a Studio without services: Predict's own
columns, no stale results beside an error, the language of new training data, GPU presets refused on a CPU
server, unique default names, short picker labels, deleting a run, a pulled vector named by its repository, and
the Train tab's message once its run has ended."""
import json
from pathlib import Path

import pytest

from tiny import ASSETS, make_tiny_model_dir, make_vector

ERR = "<span class='dx-err'>✖</span>"
LABELS = ["neg", "neu", "pos"]


@pytest.fixture
def studio(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFTX_DATA_DIRS", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    from webapp.state import Studio

    return Studio(tmp_path / "home")  # no scheduler thread: submitted runs stay queued


@pytest.fixture
def task_run(studio, tmp_path):
    """A task vector of a tiny model, listed as a pulled vector (no training)."""
    from deftx_engine.models.loading import load_cls_model

    base = str(make_tiny_model_dir(tmp_path / "data" / "tiny"))
    run_id = studio.registry.new_id()
    dest = studio.registry.vectors_root / run_id
    make_vector(load_cls_model(base, LABELS), base_model=base).save(dest)
    return studio.registry.add_vector("tiny-task", "task", dest, config={"base_model": base}, run_id=run_id)


def test_predict_reads_its_own_columns_and_clears_stale_results(studio, task_run, tmp_path):
    from webapp.tabs import predict

    csv = tmp_path / "data" / "eval.csv"
    csv.write_text("sentence,gold\nmakanan enak,pos\nburuk sekali,neg\n", encoding="utf-8")
    failed = predict.evaluate_file(studio, task_run, "", None, str(csv), "", "", "label")
    assert failed["predict.file_status"].startswith(ERR) and "Text column" in failed["predict.file_status"]
    assert failed["predict.confusion"] is None  # no previous confusion matrix beside the error
    scored = predict.evaluate_file(studio, task_run, "", None, str(csv), "sentence", "", "gold")
    status = scored["predict.file_status"]
    assert "macro-F1" in status and scored["predict.confusion"] is not None
    # a label neither true nor predicted shows "–", and the covered labels are named
    m = {"f1": {"neg": 1.0, "neu": 0.0, "pos": 1.0}, "macro_labels": ["neg", "pos"]}
    assert predict.per_label_f1(m) == "neg 1.000, neu –, pos 1.000 (macro-F1 over neg, pos: the labels in this " \
                                      "file or predicted)"
    out = predict.predict_file(studio, task_run, "", None, str(csv), "sentence", "", label_column="gold")
    rows = open(out["predict.csv"]["value"], encoding="utf-8").read().splitlines()
    assert rows[0].startswith("text,label,prediction,p_neg") and rows[1].startswith("makanan enak,pos,")
    failed = predict.predict_file(studio, task_run, "", None, str(tmp_path / "data" / "none.csv"), "", "")
    assert failed["predict.csv"]["visible"] is False
    assert predict.predict(studio, None, "", "x", "")["predict.plot"] is None


def test_a_file_that_fails_the_check_leaves_no_stale_preview(studio, tmp_path):
    from webapp.tabs import data

    bad = tmp_path / "data" / "bad.csv"
    bad.write_text("sentence\nhello\n", encoding="utf-8")
    out = data.validate_data(studio, "task", None, str(bad), "", "", "label")
    assert out["data.status"].startswith(ERR)
    assert out["data.chart"]["visible"] is False and out["data.source"] == ""
    assert list(out["data.preview"].columns) == ["what is wrong"] and "Text column" in out["data.preview"].iloc[0, 0]
    assert data.use_source(studio, "task", "", "", "", "label", "task") == {"data.use": ""}
    used = data.use_source(studio, "eval", str(bad), "sentence", "", "gold", "task")
    assert used["predict.textcol"] == "sentence" and used["predict.labelcol"] == "gold"


def test_a_malformed_csv_preview_says_what_is_wrong_and_a_cleared_upload_is_checked_again(studio, tmp_path):
    """Once a malformed CSV's preview was an empty table headed "1 2 3" ("1 fields"), and clearing an upload left
    its ✔ result on screen."""
    import os

    from webapp.state import Studio
    from webapp.tabs import data
    from webapp.ui import build_app

    bad = tmp_path / "data" / "bad.csv"
    bad.write_text('text,label\n"unclosed,pos\nok,neg\n', encoding="utf-8")
    out = data.validate_data(studio, "task", None, str(bad), "", "", "label")
    preview = out["data.preview"]
    assert list(preview.columns) == ["what is wrong"] and "line 2 has 1 field but" in preview.iloc[0, 0]
    os.environ.setdefault("DEFTX_WARMUP", "0")
    config = build_app(Studio(tmp_path / "home2")).get_config_file()
    cleared = [d for d in config["dependencies"] if any(event == "clear" for _, event in d["targets"])]
    assert [d["api_name"].startswith("validate_data") for d in cleared] == [True]  # the Data tab's upload
    again = data.validate_data(studio, "task", None, "examples/source_task_en.csv", "", "", "label")  # file cleared
    assert "source&#95;task" in again["data.status"] and again["data.source"] == "examples/source_task_en.csv"


def test_new_training_data_brings_its_language_or_asks(studio, monkeypatch):
    from webapp.tabs import train, train_checks

    assert train_checks.language_of(str(ASSETS / "target_corpus_id.txt")) == "id"
    assert train_checks.language_of("/x/wiki-sw.csv") == "sw"
    for unknown in ("/x/my_corpus.txt", "/x/data_all.csv", "hub:org/name#text", ""):
        assert train_checks.language_of(unknown) == ""
    assert train_checks.language_for_data(studio, "/x/my_corpus.txt") == {"train.lang": ""}
    args = dict(kind="language", base_model="minilm", data=str(ASSETS / "target_corpus_id.txt"), language=" ",
                name="", method="deftx", rank_policy="energy", energy=0.9, rank=10, residual_share=0.05,
                k_percent=5, full_steps=1, sparse_steps=1, epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=1,
                text_column="", pair_column="", label_column="label", preset="custom", k_exact_value=None)
    out = train.start_training(studio, **args)
    assert out["train.status"].startswith(ERR) and "Language field" in out["train.status"]
    assert not studio.registry.list()
    monkeypatch.setattr(train_checks, "has_gpu", lambda: False)
    out = train.start_training(studio, **{**args, "language": "id", "preset": "paper-xlmr-base"})
    assert "needs a GPU" in out["train.status"] and not studio.registry.list()
    names = [studio.registry.get(train.start_training(studio, **{**args, "language": "id"})["train.run_id"])["name"]
             for _ in range(2)]
    assert names == ["id-language-deftx", "id-language-deftx-2"]


def test_picker_labels_are_short_and_runs_can_be_deleted(studio, task_run):
    from webapp.render import RUN_COLUMNS, run_choices
    from webapp.tabs import runs

    (label, rid), = run_choices([studio.registry.get(task_run)])
    assert label == "tiny-task · task" and rid == task_run  # no run id or date under the dropdown's arrow
    assert RUN_COLUMNS.index("vector") < 6 and RUN_COLUMNS.index("message") < 6 and RUN_COLUMNS[0] == "run"
    folder = studio.registry.get(task_run)["run_dir"]
    asked = runs.ask_delete(studio, task_run)
    assert asked["runs.confirm"]["visible"] and "cannot be undone" in asked["runs.question"]
    out = runs.delete_run(studio, task_run)
    assert "deleted" in out["runs.status"] and studio.registry.get(task_run) is None
    assert not Path(folder).exists()


@pytest.mark.parametrize("state", ["queued", "running"])
def test_deleting_a_running_or_queued_run_cancels_it_first(studio, state):
    """README: "a running or queued run is cancelled first" (once the app refused: "cancel it first")."""
    import sys
    import time

    from webapp.tabs import runs

    reg = studio.registry
    reg.grace = 2.0
    rid = reg.submit("going", "language", [sys.executable, "-c", "import time; time.sleep(60)"])
    if state == "running":
        reg.tick()
        assert reg.get(rid)["state"] == "running"
        pid = reg.get(rid)["pid"]
    asked = runs.ask_delete(studio, rid)
    assert asked["runs.confirm"]["visible"] and f"It is {state}: it is cancelled first" in asked["runs.question"]
    out = runs.delete_run(studio, rid)
    assert "deleted" in out["runs.status"] and reg.get(rid) is None
    assert not Path(reg.runs_root / rid).exists()
    if state == "running":
        time.sleep(0.5)
        from webapp.processes import is_alive

        assert not is_alive(pid, None)


def test_train_message_follows_the_started_run_to_its_end(studio):
    from webapp.tabs import runs

    rid = studio.registry.submit("r", "language", ["true"])
    with studio.registry._transaction() as db:
        studio.registry._set(db, rid, state="failed", message="data.csv line 7: field 'label' is empty")
    rows = studio.registry.list()
    before = json.dumps([(rid, "running", 3, "")])
    msg = runs.started_outcome(studio, rows, rid, before)
    assert msg.startswith(ERR) and "failed" in msg and "line 7" in msg
    assert runs.started_outcome(studio, rows, rid, json.dumps([(rid, "failed", 3, "")])) is None  # once only


def test_a_cancelled_run_is_no_error_and_is_told_how_to_go_on_in_the_apps_words(studio):
    """A run the user cancelled ends without the red error mark, and the message names the app's Resume, not
    the CLI's --resume (the CLI's own status message is shown as the run's message elsewhere)."""
    from webapp.tabs import runs

    rid = studio.registry.submit("r", "language", ["true"])
    with studio.registry._transaction() as db:
        studio.registry._set(db, rid, state="cancelled", message="stopped by a signal")
    msg = runs.started_outcome(studio, studio.registry.list(), rid, json.dumps([(rid, "running", 3, "")]))
    assert not msg.startswith(ERR) and "cancelled" in msg and "Resume" in msg and "--resume" not in msg
    said = runs.stopped_outcome(studio, rid)["train.status"]
    assert "cancelled" in said and "Resume" in said and "--resume" not in said


def test_a_pulled_vector_is_named_by_its_repository(studio, task_run, monkeypatch):
    import shutil

    import deftx_engine.hub.transfer
    from webapp.tabs import hub

    src = studio.registry.get(task_run)["vector_dir"]

    def fake_pull(source, dest, **kw):  # a Hub vector names a Hub base model, never a folder
        shutil.copytree(src, dest)
        cfg = json.loads((Path(dest) / "sft_config.json").read_text())
        (Path(dest) / "sft_config.json").write_text(json.dumps({**cfg, "base_model": "minilm"}))

    monkeypatch.setattr(deftx_engine.hub.transfer, "pull_vector", fake_pull)
    hub.pull(studio, "someone/deftx-id-language", "", "", "", "")
    assert studio.registry.list()[0]["name"] == "someone/deftx-id-language"


def test_path_boxes_after_an_upload_hold_no_server_path(studio, task_run, tmp_path):
    """Once the Data tab's result put the upload's server path (/…/DEFTX_HOME/uploads/…) in the Train data box
    and the Predict path box; now the page's form of it, which the handlers read back."""
    import tempfile

    from webapp.tabs import data, predict

    upload = Path(tempfile.mkdtemp()) / "my eval.csv"  # where Gradio keeps an upload: the system temp folder
    upload.write_text("text,label\nmakanan enak,pos\nburuk sekali,neg\n", encoding="utf-8")
    source = data.validate_data(studio, "eval", str(upload), "", "", "", "label")["data.source"]
    assert source.startswith("DEFTX_HOME/uploads/") and source.endswith("-my_eval.csv"), source
    assert data.use_source(studio, "eval", source, "", "", "label", "task")["predict.spec"] == source
    assert "macro-F1" in predict.evaluate_file(studio, task_run, "", None, source, "", "", "label")[
        "predict.file_status"]
    corpus = upload.with_name("corpus_id.txt")
    corpus.write_text("satu dua tiga\nempat lima\n", encoding="utf-8")
    source = data.validate_data(studio, "corpus", str(corpus), "", "", "", "label")["data.source"]
    assert data.use_source(studio, "corpus", source, "", "", "label", "language")["train.data"] == source
    assert source.startswith("DEFTX_HOME/uploads/")


def test_a_stopping_message_does_not_outlive_the_stop(studio):
    """Once "Stopping <run>" stayed on the Train tab after the next run had started."""
    import sys
    import time

    from webapp.tabs import runs, train

    reg = studio.registry
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    first, second = reg.submit("first", "language", sleep), reg.submit("second", "language", sleep)
    reg.tick()
    said = train.cancel_run(studio, first)
    assert "Stopping" in said["train.status"] and said["train.stopping"] == first
    shown = runs.poll(studio, first, "", "", None, first)
    assert "train.status" not in shown  # still stopping: the message stays
    end = time.time() + 20
    while reg.get(second)["state"] != "running":
        assert time.time() < end
        reg.tick()
        time.sleep(0.1)
    tick = runs.poll(studio, first, shown["runs.watch_sig"], shown["runs.runs_sig"], None, first)
    assert "first" in tick["train.status"] and "cancelled" in tick["train.status"], tick["train.status"]
    assert "Stopping" not in tick["train.status"] and tick["train.stopping"] == ""
    assert "train.status" not in runs.poll(studio, second, tick["runs.watch_sig"], tick["runs.runs_sig"], None, "")
    reg.shutdown(cancel_running=True)


def test_a_run_name_another_run_has_is_made_distinct(studio):
    """Once two runs could share a name (every list shows runs by name)."""
    from webapp.tabs import train

    args = dict(kind="language", base_model="minilm", data="examples/target_corpus_id.txt", language="id",
                name="mine", method="deftx", rank_policy="energy", energy=0.9, rank=10, residual_share=0.05,
                k_percent=5, full_steps=1, sparse_steps=1, epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=1,
                text_column="", pair_column="", label_column="label", preset="custom", k_exact_value=None)
    first = train.start_training(studio, **args)
    second = train.start_training(studio, **args)
    assert "**mine**" in first["train.status"] and "**mine-2** (mine is taken)" in second["train.status"]
    assert sorted(r["name"] for r in studio.registry.list()) == ["mine", "mine-2"]


def test_the_progress_card_counts_the_steps_of_the_phase_that_runs():
    """A phase's steps restart at 1, so the card says where the run is within its phase, with the run's count
    beside; a finished run shows its count alone."""
    from webapp.render import progress_html

    row = {"state": "running", "name": "r", "kind": "task", "step": 0, "total_steps": 0, "phase": "sparse",
           "started": None, "finished": None}
    running = {"phase": "sparse", "step": 163, "total_steps": 5004, "phase_step": 159, "phase_steps": 5000}
    assert "step 159 / 5000 of phase 2 (163 / 5004 in all)" in progress_html(row, running, None, "")
    first = {**running, "phase": "full", "step": 3, "phase_step": 3, "phase_steps": 4}
    assert "step 3 / 4 of phase 1 (3 / 5004 in all)" in progress_html(row, first, None, "")
    done = {**running, "step": 5004}
    finished = progress_html({**row, "state": "done"}, done, None, "")
    assert "step 5004 / 5004" in finished and "of phase" not in finished
    older = {k: v for k, v in running.items() if not k.startswith("phase_")}  # a status.json from before
    assert "step 163 / 5004" in progress_html(row, older, None, "")
