"""The web app driven through gradio_client, as a script or another program would use it.

One app on a free localhost port for the module, a tiny random BERT (tests/tiny.py) as the base model, a few
training steps per run: validate uploads, train a language and a task SFT to the end, cancel a run, analyze,
predict, score a file, pull a folder, push without a token, and restart recovery. No network.
"""
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from tiny import ASSETS, make_tiny_model_dir

# gradio's own queue code (queueing.py) triggers pandas 3 deprecation warnings on every Dataframe output
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
FINAL = ("done", "failed", "cancelled", "interrupted")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, launch_app, tiny_model):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFTX_WARMUP", "0")  # keep the CPU for the runs
        mp.setenv("DEFTX_DATA_DIRS", str(Path(tiny_model).parent))  # local base models only from allowed folders
        home = tmp_path_factory.mktemp("home")
        demo, studio = launch_app(home)
        yield demo, home
        studio.registry.shutdown(cancel_running=True)
        demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    demo, _ = app
    return Client(demo.local_url, verbose=False, download_files=str(app[1] / "client-downloads"))


START = dict(kind="task", data=str(ASSETS / "source_task_en.csv"), language="en", name="", method="deftx",
             rank_policy="energy", energy=0.9, rank=100, residual_share=0.05, k_percent=5, full_steps=2,
             sparse_steps=2, epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=1, text_column="", pair_column="",
             label_column="label", preset="custom")


def start(client, tiny_model, kind, data, steps=2, **kw):
    args = {**START, "kind": kind, "base_model": tiny_model, "data": str(data),
            "language": "id" if kind == "language" else "en", "name": kw.pop("name", f"{kind}-test"),
            "full_steps": steps, "sparse_steps": steps}
    args.update(kw)
    msg, run_id, _progress, _watch = client.predict(**args, api_name="/start_training")
    assert run_id, msg
    return run_id


def wait_final(client, run_id, timeout=240, until=FINAL):
    end = time.time() + timeout
    while time.time() < end:
        st = client.predict(run_id, api_name="/run_status")
        if st.get("state") in until:
            return st
        time.sleep(1)
    raise AssertionError(f"run {run_id} not finished after {timeout}s: {st}")


@pytest.fixture(scope="module")
def trained(client, tiny_model):
    """A language and a task run of the tiny model, trained to the end (queued one after the other)."""
    lang = start(client, tiny_model, "language", ASSETS / "target_corpus_id.txt", name="lang-id")
    task = start(client, tiny_model, "task", ASSETS / "source_task_en.csv", name="task-en")
    ls, ts = wait_final(client, lang), wait_final(client, task)
    assert ls["state"] == "done", ls
    assert ts["state"] == "done", ts
    return lang, task


def test_endpoints_have_stable_names(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/validate_data", "/start_training", "/cancel_run", "/list_runs", "/run_status", "/analyze",
            "/predict", "/push", "/pull"} <= names


def test_validate_good_and_bad_uploads(client, app, tmp_path):
    from gradio_client import handle_file

    msg, preview, chart = client.predict("task", handle_file(str(ASSETS / "source_task_en.csv")), "", "", "",
                                         "label", api_name="/validate_data")
    assert "300 texts" in msg and "3 labels" in msg and "Used for task SFTs" in msg
    assert preview["headers"] == ["text", "label"] and len(preview["data"]) == 20
    assert chart["value"]["type"] == "plotly"
    stored = list((app[1] / "uploads").glob("*-source_task_en.csv"))  # copied under a content-hash name
    assert len(stored) == 1 and stored[0].read_bytes() == (ASSETS / "source_task_en.csv").read_bytes()

    msg, _, _ = client.predict("corpus", None, str(ASSETS / "target_corpus_id.txt"), "", "", "label",
                               api_name="/validate_data")
    assert "400 lines" in msg

    bad = tmp_path / "reviews.csv"
    bad.write_text("text,label\nGood food.,positive\n,negative\n", encoding="utf-8")
    msg, *_ = client.predict("task", handle_file(str(bad)), "", "", "", "label", api_name="/validate_data")
    assert "reviews.csv line 3" in msg and "'text'" in msg and "Traceback" not in msg
    assert "/uploads/" not in msg  # the name the user uploaded, not where it is stored

    cols = tmp_path / "cols.csv"
    cols.write_text("sentence,sentiment\nGood.,positive\n", encoding="utf-8")
    msg, *_ = client.predict("task", handle_file(str(cols)), "", "", "", "label", api_name="/validate_data")
    assert "cols.csv line 1" in msg and "sentence, sentiment" in msg

    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\x00\x01\x02")
    msg, *_ = client.predict("corpus", handle_file(str(binary)), "", "", "", "label", api_name="/validate_data")
    assert "binary" in msg

    msg, *_ = client.predict("corpus", None, "/etc/passwd", "", "", "label", api_name="/validate_data")
    assert "only reads files you upload" in msg


def test_upload_size_limit(client, tmp_path, monkeypatch):
    from gradio_client import handle_file

    monkeypatch.setenv("DEFTX_MAX_UPLOAD_MB", "0.0001")  # ~100 bytes, read when the file arrives
    big = tmp_path / "big.txt"
    big.write_text("Saya suka makan nasi goreng.\n" * 20, encoding="utf-8")
    msg, *_ = client.predict("corpus", handle_file(str(big)), "", "", "", "label", api_name="/validate_data")
    assert "over the upload limit" in msg


def test_bad_settings_are_refused_inline(client, tiny_model):
    msg, run_id, *_ = client.predict(kind="language", base_model=tiny_model, data=str(ASSETS / "target_corpus_id.txt"),
                                     language="id", name="", method="deftx", rank_policy="energy", energy=0.9,
                                     rank=100, residual_share=0.05, k_percent=5, full_steps=1, sparse_steps=1,
                                     epochs=1, lr=0.0, batch_size=8, max_length=32, seed=1, text_column="",
                                     pair_column="", label_column="label", preset="custom",
                                     api_name="/start_training")
    assert "lr must be a finite number > 0" in msg and not isinstance(run_id, str)  # run id left unchanged (a skip)


def test_language_and_task_runs_finish(client, trained):
    lang, task = trained
    table = client.predict(api_name="/list_runs")
    rows = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}
    assert rows[lang]["state"] == "done" and rows[task]["state"] == "done"
    assert rows[lang]["vector"].endswith(f"{lang}/vector")
    assert "deftx" in rows[lang]["settings"] and "k=5.0%" in rows[lang]["settings"]
    st = client.predict(task, api_name="/run_status")
    assert st["step"] == st["total_steps"] == 4 and st["message"].startswith("vector saved")
    from deftx_engine.models.precision import resolve

    assert st["precision"] == resolve("auto").name  # what the run's matrix products ran in


def test_start_and_cancel(client, tiny_model, trained):
    run_id = start(client, tiny_model, "language", ASSETS / "target_corpus_id.txt", steps=500, name="to-cancel")
    wait_final(client, run_id, timeout=180, until=("running",) + FINAL)
    deadline = time.time() + 120
    while client.predict(run_id, api_name="/run_status").get("step", 0) < 1 and time.time() < deadline:
        time.sleep(0.5)  # let it reach the training loop, so the stop is the engine's clean one
    t0 = time.time()
    msg, _ = client.predict(run_id, api_name="/cancel_run")
    assert "Stopping" in msg
    st = wait_final(client, run_id, timeout=60)
    assert st["state"] == "cancelled", st
    assert time.time() - t0 < 30
    assert "stopped by a signal" in st["message"]


def test_analyze_spectrum_density_overlap(client, trained):
    lang, task = trained
    msg, summary, matrix, spectrum, density, overlap, table = client.predict(lang, "", task, api_name="/analyze")
    assert msg == ""
    assert "language vector (id)" in summary and "overlap with **task-en**" in summary and "Jaccard" in summary
    assert "  - embeddings: " in summary and "  - attention: " in summary  # the overlap per parameter group
    assert matrix["value"] in [c[1] for c in matrix["choices"]]
    assert spectrum["visible"] is True and overlap["visible"] is True  # updates: hidden when there is nothing
    spectrum, overlap = spectrum["value"], overlap["value"]
    for fig in (spectrum, density, overlap):
        assert fig["type"] == "plotly"
    assert "singular value" in spectrum["plot"] and "Jaccard" in overlap["plot"]
    assert table["headers"][:3] == ["matrix", "shape", "rank"]
    other = matrix["choices"][-1][1]
    msg, spectrum2, *_ = client.predict(lang, other, api_name="/spectrum")
    assert spectrum2["visible"] is True
    assert spectrum2["value"]["type"] == "plotly" and other in spectrum2["value"]["plot"]


def test_predict_and_score(client, trained):
    lang, task = trained
    msg, fig = client.predict(task, lang, "Makanannya enak sekali!", "", api_name="/predict")
    assert fig["type"] == "plotly" and "Label probabilities" in fig["plot"]
    assert any(label in msg for label in ("negative", "neutral", "positive"))
    assert "built and cached" in msg
    msg, _ = client.predict(task, lang, "Pelayanannya lambat.", "", api_name="/predict")
    assert "cached" not in msg  # the composed model is reused

    msg, _ = client.predict(task, lang, "   ", "", api_name="/predict")
    assert "type a text" in msg
    msg, _ = client.predict(lang, "", "x", "", api_name="/predict")  # a language vector as the task
    assert "task vector" in msg

    msg, conf = client.predict(task, lang, None, str(ASSETS / "target_eval_id.csv"), "", "", "label",
                               api_name="/evaluate")
    assert "macro-F1" in msg and "90 examples" in msg and conf["type"] == "plotly"
    msg, csv_file = client.predict(task, lang, None, str(ASSETS / "target_eval_id.csv"), "", "",
                                   api_name="/predict_file")
    assert csv_file["visible"] is True  # the download appears once there is a file
    lines = Path(csv_file["value"]).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "text,label,prediction,p_negative,p_neutral,p_positive" and len(lines) == 91  # gold kept


def test_pull_local_folder_and_push_without_token(client, app, trained, monkeypatch):
    _, home = app
    lang, _ = trained
    msg, _ = client.predict(str(home / "runs" / lang / "vector"), "", "", "", "", api_name="/pull")
    assert "a language vector (id)" in msg
    table = client.predict(api_name="/list_runs")
    pulled = [dict(zip(table["headers"], r)) for r in table["data"]]
    pulled = [r for r in pulled if r["message"].startswith("pulled from")]
    assert len(pulled) == 1 and pulled[0]["name"] == lang and pulled[0]["kind"] == "language"
    assert pulled[0]["state"] == "done"

    monkeypatch.delenv("HF_TOKEN", raising=False)
    msg, token_field = client.predict(lang, "someone/deftx-test", False, "", api_name="/push")
    assert "needs a Hugging Face token" in msg
    msg, _ = client.predict(lang, "not a repo id", False, "hf_secret", api_name="/push")
    assert "owner/name" in msg and "hf_secret" not in msg


def test_restart_recovery(tmp_path, launch_app):
    """A run whose process died while the app was down is `interrupted` after the app restarts."""
    from gradio_client import Client

    from webapp.jobs import JobRegistry

    old = JobRegistry(tmp_path)
    rid = old.submit("lost", "language", [sys.executable, "-c", "import time; time.sleep(60)"])
    old.tick()
    row = old.get(rid)
    assert row["state"] == "running"
    old.stop()  # the app exits ...
    os.kill(row["pid"], signal.SIGKILL)  # ... and the training process dies too
    old._procs[rid].wait()
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:
        assert db.execute("SELECT state FROM runs WHERE id=?", (rid,)).fetchone()[0] == "running"

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFTX_WARMUP", "0")
        demo, studio = launch_app(tmp_path)
    try:
        c = Client(demo.local_url, verbose=False)
        table = c.predict(api_name="/list_runs")
        row = {r[0]: dict(zip(table["headers"], r)) for r in table["data"]}[rid]
        assert row["state"] == "interrupted"
        assert c.predict(rid, api_name="/run_status")["state"] == "interrupted"
    finally:
        studio.registry.stop()
        demo.close()


def test_push_with_model_card_and_metrics(client, trained, hub_server, monkeypatch):
    """Push through the Hub tab to the local Hub (tests/hub_server.py, over HTTP): files and model card committed,
    metrics from the Predict tab's scoring in the card, the token used but never returned, the field cleared."""
    lang, task = trained
    client.predict(task, lang, None, str(ASSETS / "target_eval_id.csv"), "", "", "label", api_name="/evaluate")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    msg, token_field = client.predict(task, "someone/deftx-task", True, hub_server.token, api_name="/push")
    assert "Pushed to" in msg and "someone/deftx-task" in msg and hub_server.token not in msg
    assert token_field == ""
    repo = hub_server.repos["someone/deftx-task"]
    assert repo.private is True and set(repo.files) >= {"sft_config.json", "sft_model.safetensors", "README.md"}
    card = repo.files["README.md"].decode("utf-8")
    assert "## Metrics" in card and "macro_f1" in card and "task_only_macro_f1" in card
    assert "target_eval_id.csv (task + language vector, sum, scale 1)" in card

    wrong = "hf_abcdefghijklmnop"  # the server refuses it, quoting the credentials it got
    msg, token_field = client.predict(task, "someone/deftx-task", False, wrong, api_name="/push")
    assert "failed" in msg and wrong not in msg and token_field == ""
    assert repo.commits == 1


@pytest.mark.parametrize("n_lines", [5, 30])
def test_a_corpus_smaller_than_a_head_fit_batch_trains(client, tiny_model, n_lines):
    """5 or 30 lines (fewer than the head fit's 32 a batch, which used to spin forever): the run finishes."""
    corpus = Path(tiny_model).parent / f"small-{n_lines}.txt"
    lines = (ASSETS / "target_corpus_id.txt").read_text(encoding="utf-8").splitlines()[:n_lines]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_id = start(client, tiny_model, "language", corpus, name=f"small-{n_lines}")
    st = wait_final(client, run_id, timeout=180)
    assert st["state"] == "done", st


def test_no_server_path_on_the_page_or_in_responses(client, app, tiny_model):
    """README: the page and the responses show DEFTX_HOME/…, examples/… or DEFTX_DATA_DIRS/…, never an absolute
    path (once: the page config and the cpu-demo preset held the example files' server paths, and an example
    file's error named it); a path in that form is a valid input."""
    import json
    import urllib.request

    demo, home = app
    server = [str(Path(__file__).resolve().parents[2]), str(home), str(Path(tiny_model).parent)]

    def leaks(value) -> list[str]:
        text = json.dumps(value, default=str)
        return [s for s in server if s in text]

    with urllib.request.urlopen(demo.local_url + "config", timeout=30) as r:
        assert not leaks(json.load(r))
    preset = client.predict("cpu-demo", "language", api_name="/apply_preset")
    corpus = next(v for v in preset if isinstance(v, str) and v.endswith("target_corpus_id.txt"))
    assert not leaks(preset) and corpus == "examples/target_corpus_id.txt", preset
    said = client.predict("task", None, corpus, "", "", "label", api_name="/validate_data")
    assert "dx-err" in said[0] and "target_corpus_id.txt" in said[0] and not leaks(said), said[0]
    said = client.predict("corpus", None, "examples/none.txt", "", "", "label", api_name="/validate_data")
    assert "does not exist" in said[0] and not leaks(said), said[0]
    run_id = start(client, tiny_model, "language", corpus, name="shown-path")
    assert client.predict(run_id, api_name="/cancel_run")


def test_start_training_takes_a_source_language_vector_through_the_api(client, app, tiny_model):
    """The source-language option was unusable through the API (its choices are filled per browser session:
    "not in the list of choices"); now any run id is taken and checked by start_training."""
    from deftx_engine.models.loading import load_cls_model
    from tiny import make_vector
    from webapp.rundb import RunDB

    _, home = app
    reg = RunDB(home)
    base = str(Path(tiny_model).resolve())
    lang = reg.new_id()
    make_vector(load_cls_model(base, ["negative", "neutral", "positive"]), kind="language",
                base_model=base).save(reg.vectors_root / lang)
    reg.add_vector("src-lang", "language", reg.vectors_root / lang, run_id=lang, config={"base_model": base})
    run_id = start(client, tiny_model, "task", ASSETS / "source_task_en.csv", name="on-source",
                   source_language_vector=lang)
    assert reg.get(run_id)["config"]["source_language_vector"] == str(reg.vectors_root / lang)
    client.predict(run_id, api_name="/cancel_run")
    msg, run_id, *_ = client.predict(**{**START, "base_model": tiny_model, "source_language_vector": "nope"},
                                     api_name="/start_training")
    assert "dx-err" in msg and "unknown run" in msg and not isinstance(run_id, str)
