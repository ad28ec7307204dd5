"""Issue 11 (the app attacked), web side: each test is one class of attack that once crashed the app, broke a
README promise or gave an unclear answer; the handlers are called as the API calls them (``api(studio)``)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tiny import ASSETS, make_vector, tiny_bert_config

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
ERR = "<span class='dx-err'>"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def studio(tmp_path, monkeypatch):
    for var in ("DEFTX_MAX_LINES", "DEFTX_MAX_TEXT_CHARS", "DEFTX_MAX_SCORE_SECONDS", "DEFTX_AUTH", "SPACE_ID",
                "GRADIO_SERVER_NAME", "DEFTX_DATA_DIRS"):
        monkeypatch.delenv(var, raising=False)
    from webapp.state import Studio

    return Studio(tmp_path / "home")  # no scheduler thread


def refused(msg: str, *words: str) -> None:
    assert msg.startswith(ERR) and "unexpected error" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


class Request:
    """What Gradio passes as ``gr.Request``: only the session matters here."""

    def __init__(self, session: str):
        self.session_hash = session


@pytest.fixture
def fake_model(monkeypatch):
    """Predict with a stand-in for the composed model: label 'positive' always, ``delay`` seconds a batch."""
    from deftx_engine.outputs import inference
    from webapp.tabs import predict

    names = ["negative", "positive"]
    state = {"delay": 0.0}

    def proba(model, tok, texts, pairs=None, batch_size=32, max_length=128, stop=None):
        out = []
        for i in range(0, len(texts), batch_size):
            why = stop() if stop else None
            if why:
                raise inference.DeftxError(f"stopped after {i:,} of {len(texts):,} rows: {why}")
            time.sleep(state["delay"])
            out.append(torch.tensor([[0.1, 0.9]] * len(texts[i:i + batch_size])))
        return torch.cat(out)

    def scores(model, tok, td, batch_size=32, stop=None):
        proba(model, tok, td.texts, stop=stop)
        return {"n": len(td.texts), "accuracy": 0.5, "macro_f1": 0.5, "f1": dict.fromkeys(names, 0.5),
                "labels": names, "confusion": [[1, 0], [1, 0]]}

    monkeypatch.setattr(inference, "predict_proba", proba)
    monkeypatch.setattr(inference, "evaluate_task_data", scores)
    monkeypatch.setattr(predict, "composed", lambda studio, *a, **kw: ((None, None, names), True))
    return state


def task_run(studio, name="task") -> str:
    folder = studio.home / "vectors" / name
    folder.mkdir(parents=True)
    return studio.registry.add_vector(name, "task", folder, config={})


# ---- 1: bounded input, bounded and cancellable scoring ---------------------------------------------
def test_long_texts_are_refused_before_tokenizing(studio, api, monkeypatch):
    fns = api(studio)
    msg, _ = fns["predict"](None, None, "x" * 1_000_001, "")
    refused(msg, "1,000,001 characters", "DEFTX_MAX_TEXT_CHARS")
    msg, _ = fns["predict"](None, None, "fine", "y" * 20_000)
    refused(msg, "second text", "DEFTX_MAX_TEXT_CHARS")
    from webapp import settings

    assert settings.max_lines() is None
    monkeypatch.setenv("DEFTX_AUTH", "a:b")  # a shared deployment gets a default line limit
    assert settings.max_lines() == settings.SHARED_MAX_LINES


@pytest.fixture
def slow_real_model(monkeypatch):
    """Predict with a real tiny classifier and tokenizer (so the real ``predict_proba`` batches and asks the stop
    check), each batch slowed down by ``delay`` seconds; only the composition of vectors is skipped."""
    from transformers import BertForSequenceClassification, BertTokenizer

    from webapp.tabs import predict

    names = ["negative", "positive"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "line"] + [str(d) for d in range(10)]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=len(vocab), num_labels=2)).eval()
    state = {"delay": 0.0, "batches": 0}

    def slow(module, args, kwargs):
        state["batches"] += 1
        time.sleep(state["delay"])

    model.register_forward_pre_hook(slow, with_kwargs=True)
    monkeypatch.setattr(predict, "composed", lambda studio, *a, **kw: ((model, tok, names), True))
    return state


def test_file_scoring_stops_on_request_and_on_time(studio, slow_real_model, tmp_path, monkeypatch):
    """The messages come from the real scoring loop (``inference.predict_proba``) and the real stop check
    (``predict.scoring``): a Stop ends it after the current batch, DEFTX_MAX_SCORE_SECONDS when it has passed."""
    import re

    from webapp.tabs import predict

    run = task_run(studio)
    big = studio.home / "big.txt"
    big.write_text("".join(f"line {i}\n" for i in range(3200)))  # 100 batches of 32
    slow_real_model["delay"] = 0.05
    result = {}
    worker = threading.Thread(target=lambda: result.update(predict.predict_file(
        studio, run, None, None, str(big), "", "", request=Request("s1"))))
    worker.start()
    deadline = time.monotonic() + 20
    while slow_real_model["batches"] < 2 and time.monotonic() < deadline:  # scoring has begun
        time.sleep(0.01)
    assert "Stopping" in predict.stop_scoring(studio, request=Request("s1"))["predict.file_status"]
    worker.join(10)
    assert not worker.is_alive()
    msg = result["predict.file_status"]
    refused(msg, "of 3,200 rows: stopped with the Stop button")
    done = int(re.search(r"stopped after ([\d,]+) of", msg)[1].replace(",", ""))
    batches = slow_real_model["batches"]
    assert 0 < done < 3200 and done == 32 * batches, (msg, batches)  # stopped between batches, well before the end
    assert "s1" not in studio.scoring and not list(studio.outputs.iterdir())
    assert predict.stop_scoring(studio, request=Request("s1"))["predict.file_status"] == "Nothing is being scored."

    monkeypatch.setenv("DEFTX_MAX_SCORE_SECONDS", "1")
    slow_real_model["batches"] = 0
    t0 = time.monotonic()
    out = predict.predict_file(studio, run, None, None, str(big), "", "", request=Request("s2"))
    refused(out["predict.file_status"], "of 3,200 rows: over this server's limit of 1 s (DEFTX_MAX_SCORE_SECONDS)")
    assert 1.0 <= time.monotonic() - t0 < 5 and 0 < slow_real_model["batches"] < 100
    assert "s2" not in studio.scoring and not list(studio.outputs.iterdir())

    monkeypatch.delenv("DEFTX_MAX_SCORE_SECONDS")  # not stopped: a file is scored whole
    small = studio.home / "small.txt"
    small.write_text("".join(f"line {i}\n" for i in range(70)))
    slow_real_model["batches"] = 0
    out = predict.predict_file(studio, run, None, None, str(small), "", "", request=Request("s3"))
    assert "70 rows of" in out["predict.file_status"] and slow_real_model["batches"] == 3
    assert len(Path(out["predict.csv"]["value"]).read_text().splitlines()) == 71


# ---- 5: prediction files are unguessable, unique, and no server path is shown ----------------------
def test_prediction_files_are_unique_per_request_and_paths_stay_private(studio, fake_model, api):
    run = task_run(studio)
    fns = api(studio)
    names = set()
    for _ in range(3):  # same file, same second
        _, csv = fns["predict_file"](run, None, None, str(ASSETS / "target_corpus_id.txt"), "", "")
        path = Path(csv["value"])
        assert path.parent == studio.outputs and path.read_text().startswith("text,prediction")
        names.add(path.name)
    assert len(names) == 3 and all(len(n.split("-")[1]) == 32 for n in names)
    assert not [p for p in studio.outputs.iterdir() if p.name.startswith(".")]  # written aside, renamed
    table = fns["list_runs"]().to_csv()
    assert str(studio.home) not in table and "DEFTX_HOME/vectors/task" in table
    assert str(studio.home) not in json.dumps(fns["run_status"](run))


# ---- 7: concurrent evaluations keep every metric -----------------------------------------------------
def test_concurrent_evaluations_store_every_metric(studio, fake_model, api, monkeypatch, tmp_path):
    run = task_run(studio)
    get = studio.registry.get
    monkeypatch.setattr(studio.registry, "get", lambda rid: (time.sleep(0.1), get(rid))[1])  # widen any race
    files = []
    for i in range(6):
        f = studio.home / f"eval{i}.csv"
        f.write_text("text,label\ngood,positive\nbad,negative\n")
        files.append(f)
    fns = api(studio)
    threads = [threading.Thread(target=fns["evaluate"], args=(run, None, None, str(f), "", "", "label"))
               for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    metrics = get(run)["config"]["metrics"]
    assert sorted(metrics) == sorted(f"eval{i}.csv (task vector alone)" for i in range(6))


# ---- 4: base models confined; a pulled vector naming a folder refused --------------------------------
@pytest.mark.parametrize("base", ["/etc", "../../../../etc", "/usr/lib", "~", "/proc/self"])
def test_base_models_outside_the_allowed_folders_are_refused(studio, api, base):
    msg, run_id, *_ = api(studio)["start_training"](
        kind="language", base_model=base, data=str(ASSETS / "target_corpus_id.txt"), language="id", name="x",
        method="deftx", rank_policy="energy", energy=0.9, rank=10, residual_share=0.05, k_percent=5, full_steps=1,
        sparse_steps=1, epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=1, text_column="", pair_column="",
        label_column="label", preset="custom", k_exact_value=None)
    refused(msg, "the app loads only minilm, multilingual-e5-small")
    assert "passwd" not in msg and "Unrecognized" not in msg and not studio.registry.list()


def test_hub_base_models_need_a_reachable_hub(studio, monkeypatch):
    from huggingface_hub import constants

    from deftx_engine.errors import DeftxError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (the client reads the variable once, at import)
    with pytest.raises(DeftxError, match="not in the local model cache and the Hugging Face Hub is switched off"):
        studio.check_base_model("someone/no-such-model-4242")
    assert studio.check_base_model("multilingual-e5-small") == "multilingual-e5-small"


def test_an_empty_base_model_is_the_default_and_start_names_it(studio, monkeypatch):
    from webapp.tabs.start import intro

    assert studio.check_base_model("") == "multilingual-e5-small"
    monkeypatch.setenv("DEFTX_DEFAULT_MODEL", "minilm")
    assert studio.check_base_model(None) == "minilm" and "`minilm`" in intro(studio)


def tiny_vector(folder: Path, **meta) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    vec = make_vector(BertForSequenceClassification(tiny_bert_config(num_labels=3)))
    for k, v in meta.items():
        setattr(vec.meta, k, v)
    return vec.save(folder)


def test_a_pulled_vector_naming_a_local_folder_is_refused(studio, api, hub_server):
    """From the Hub (the local one, over HTTP): no local folder at all; from an allowed folder: only model folders
    in the allowed folders."""
    src = tiny_vector(studio.home / "incoming" / "v", base_model="/etc")
    hub_server.add_repo("someone/vector", src)
    msg, _ = api(studio)["pull"]("someone/vector", "", "", "", "")
    refused(msg, "never a local folder")
    msg, _ = api(studio)["pull"](str(src), "", "", "", "")
    refused(msg, "the app loads only")
    assert "passwd" not in msg and not studio.registry.list() and not list(studio.registry.vectors_root.iterdir())


# ---- 8, 9 and 12: Analyze answers, and no markup from a vector reaches the page --------------------------
def test_analyze_refusals_fill_every_output_with_a_message(studio, api):
    fns = api(studio)
    out = fns["analyze"]("no-such-run", None, None)
    assert len(out) == 7
    refused(out[0], "unknown run")
    bad = studio.home / "vectors" / "bad"
    tiny_vector(bad)
    cfg = json.loads((bad / "sft_config.json").read_text())
    (bad / "sft_config.json").write_text(json.dumps({**cfg, "kind": ["task"]}))
    out = fns["analyze"](studio.registry.add_vector("bad", "task", bad), None, None)
    assert len(out) == 7
    refused(out[0], "field 'kind'")


def test_a_vector_without_spectra_says_so_and_shows_no_empty_plot(studio, api):
    fns = api(studio)
    run_id = studio.registry.add_vector("pulled", "task", tiny_vector(studio.home / "vectors" / "pulled"))
    msg, summary, matrix, spectrum, density, *_ = fns["analyze"](run_id, None, None)
    assert msg == "" and "SVD spectra: none" in summary and "pulled vector" in summary
    assert spectrum["visible"] is False and spectrum["value"] is None and matrix["choices"] == []
    assert density is not None  # the rest of the analysis is still there
    msg, spectrum = fns["spectrum"](run_id, "x")[:2]
    assert "pulled vector" in msg and spectrum["visible"] is False


def test_comparing_a_vector_with_itself_says_so(studio, api):
    """Once "Compare with" equal to the chosen vector gave an empty overlap chart and no word."""
    fns = api(studio)
    run_id = studio.registry.add_vector("pulled", "task", tiny_vector(studio.home / "vectors" / "pulled"))
    msg, summary, *_, overlap, _ = fns["analyze"](run_id, None, run_id)
    assert msg == "" and "same vector" in summary and "choose another" in summary, summary
    assert overlap["visible"] is False and overlap["value"] is None
    other = studio.registry.add_vector("other", "task", tiny_vector(studio.home / "vectors" / "other"))
    *_, overlap, _ = fns["analyze"](run_id, None, other)
    assert overlap["visible"] is True and overlap["value"] is not None


EVIL = "<img src=http://evil.example/x.png>![y](http://evil.example/y.png)`"


def test_markup_from_a_vector_is_escaped(studio, api):
    fns = api(studio)
    folder = tiny_vector(studio.home / "vectors" / "evil", method=EVIL, language=EVIL, base_model="minilm" + EVIL,
                         denoise={"rank_policy": "energy", "energy": EVIL, "residual_share": EVIL})
    out = fns["analyze"](studio.registry.add_vector(EVIL, "task", folder), None, None)
    summary = out[1]
    assert "evil.example" in summary and "<img" not in summary and "](" not in summary and "`" not in summary
    src = tiny_vector(studio.home / "incoming" / "evil", language=EVIL)
    msg, _ = fns["pull"](str(src), "", "", "", "")
    assert "evil.example" in msg and "<img" not in msg and "](" not in msg, msg


# ---- 2: one bad registry row does not stop the scheduler or the app ---------------------------------------
def test_recovery_and_scheduler_survive_a_bad_row(studio):
    reg = studio.registry
    bad = reg.submit("bad", "language", [sys.executable, "-c", "pass"])
    gone = reg.submit("gone", "language", [sys.executable, "-c", "pass"])
    nxt = reg.submit("next", "language", [sys.executable, "-c", "pass"])
    with reg._transaction() as db:
        for rid in (bad, gone):
            db.execute("UPDATE runs SET state='running', owner='1:1:gone' WHERE id=?", (rid,))
    run_dir = Path(reg.get(bad)["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "step": 10 ** 30, "total_steps": 10 ** 30,
                                                     "updated": time.time() + 1}))
    assert reg.recover() == [gone]  # once: "Python int too large to convert to SQLite INTEGER", and the app exited
    assert reg.get(bad)["state"] == "failed" and "marked failed" in reg.get(bad)["message"]
    assert reg.get(gone)["state"] == "interrupted"  # its folder is gone: never "done"
    reg.tick()
    assert reg.wait(nxt, timeout=30)["state"] in ("failed", "done")  # the queue went on


# ---- 14: failed logins are throttled ----------------------------------------------------------------
def test_failed_logins_are_throttled(monkeypatch, tmp_path):
    import asyncio
    import inspect

    from webapp.settings import LoginThrottle, launch_kwargs

    monkeypatch.setenv("DEFTX_AUTH", "alice:right")
    login = launch_kwargs(tmp_path)["auth"]
    assert inspect.iscoroutinefunction(login)  # Gradio awaits only a coroutine function
    assert asyncio.run(login("alice", "right")) is True and asyncio.run(login("alice", "wrong")) is False

    now = [0.0]
    gate = LoginThrottle([("alice", "right")], clock=lambda: now[0])
    answered = [gate.check("alice", f"guess{i}", "10.0.0.66") for i in range(300)]
    assert not any(answered) and gate.check("alice", "right", "10.0.0.66") is False  # the guessing source waits
    assert gate.check("bob", "right", "10.0.0.7") is False


def test_a_login_throttle_slows_the_source_and_never_locks_the_account():
    """Once the lock was per user name only: 5 wrong passwords from anyone locked a real user out (30 s doubling
    to 15 min, never reset by a successful login), so about 20 requests an hour kept them out indefinitely."""
    from webapp.settings import LoginThrottle as T

    now = [0.0]
    gate = T([("alice", "right")], clock=lambda: now[0])
    for i in range(300):  # one guessing source: locked after FAILURES, its lock doubling while it goes on
        gate.check("alice", f"guess{i}", "10.0.0.66")
        now[0] += 1
    assert gate.check("alice", "right", "10.0.0.66") is False
    assert gate.check("alice", "right", "10.0.0.7") is True  # the account is not locked: its user logs in
    assert gate.wait("alice") == T.DELAY  # ... and that cleared the user's failures
    for _ in range(3):  # a user mistyping, then logging in: the success resets the client's count too
        for _ in range(T.FAILURES - 1):
            assert gate.check("alice", "typo", "10.0.0.7") is False
        assert gate.check("alice", "right", "10.0.0.7") is True
    many = [gate.check("alice", f"g{i}", f"10.1.{i // 250}.{i % 250}") for i in range(1000)]  # many sources
    assert not any(many) and gate.wait("alice") == T.MAX_DELAY  # slowed, per user, from any source...
    assert gate.check("alice", "right", "10.0.0.8") is True  # ...and never locked
    now[0] += T.MAX_LOCK + 1
    assert gate.check("alice", "right", "10.0.0.66") is True  # a source's lock ends
    assert len(gate._failures) <= T.TABLE and len(gate._locked) <= T.TABLE + 1


# ---- 15: every string bounded -----------------------------------------------------------------------
def test_huge_strings_are_refused_not_echoed(studio, api):
    fns = api(studio)
    msg, _ = fns["pull"]("o/" + "x" * 100_000, "", "", "", "")
    refused(msg, "at most 500")
    assert len(msg) < 500
    msg, *_ = fns["start_training"](
        kind="language", base_model="minilm", data=str(ASSETS / "target_corpus_id.txt"), language="id",
        name="n" * 1_000_000, method="deftx", rank_policy="energy", energy=0.9, rank=10, residual_share=0.05,
        k_percent=5, full_steps=1, sparse_steps=1, epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=1,
        text_column="", pair_column="", label_column="label", preset="custom", k_exact_value=None)
    refused(msg, "run name", "at most 100")
    assert len(msg) < 500 and not studio.registry.list()


# ---- 11: start-up settings give one line -------------------------------------------------------------------
@pytest.mark.parametrize("var, value, says", [("DEFTX_HOME", "/proc/x", "DEFTX_HOME"),
                                              ("GRADIO_SERVER_PORT", "99999", "GRADIO_SERVER_PORT")])
def test_bad_start_up_settings_give_one_line(tmp_path, var, value, says):
    env = {**os.environ, "DEFTX_HOME": str(tmp_path / "home"), "DEFTX_WARMUP": "0", var: value}
    env.pop("DEFTX_AUTH", None)
    p = subprocess.run([sys.executable, "app.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and says in lines[0] and "Traceback" not in p.stderr, p.stderr


# ---- run ids that are not ids; a vector deleted while it is scored (issue 20) ---------------------------
@pytest.mark.parametrize("bad", [{"a": 1}, [1, 2], "x" * 100_000, 7])
def test_run_ids_that_are_not_ids_are_unknown_runs(studio, api, bad):
    fns = api(studio)
    msg, *_ = fns["analyze"](bad, "", "")
    refused(msg, "unknown run")
    assert len(msg) < 400  # a 100,000-character id is not echoed back
    msg, *_ = fns["predict"](bad, "", "text", "")
    refused(msg, "unknown run")
    for name, args in (("cancel_run", (bad,)), ("resume_run", (bad,))):
        out = fns[name](*args)
        first = out[0] if isinstance(out, (tuple, list)) else out
        assert "unexpected error" not in str(first) and len(str(first)) < 400, (name, str(first)[:200])
    assert studio.registry.get(bad) is None


def test_scores_survive_their_run_being_deleted_meanwhile(studio, fake_model, api, monkeypatch):
    """Session A scores a file while session B deletes the run: A keeps its scores (no KeyError)."""
    run = task_run(studio)
    f = studio.home / "eval.csv"
    f.write_text("text,label\ngood,positive\nbad,negative\n")
    real = studio.registry.add_metrics

    def delete_first(*a, **kw):  # B deletes the run between A's scoring and A's recording of the metrics
        studio.registry.delete(run)
        return real(*a, **kw)

    monkeypatch.setattr(studio.registry, "add_metrics", delete_first)
    msg, *_ = api(studio)["evaluate"](run, None, None, str(f), "", "", "label")
    assert "unexpected error" not in msg and "macro-F1" in msg, msg


def test_scores_survive_their_vectors_being_deleted_while_scored(studio, fake_model, api, monkeypatch):
    """Session A scores a file with a task and a language vector; session B deletes the task run while A's
    composed model is scoring: A gets both scores (once: "unknown run" when the task vector alone was built
    after the composed model's scoring, and the scores computed were lost)."""
    from deftx_engine.outputs import inference
    from webapp.tabs import predict

    task = task_run(studio)
    lang_dir = studio.home / "vectors" / "lang"
    lang_dir.mkdir(parents=True)
    lang = studio.registry.add_vector("lang", "language", lang_dir, config={})

    def resolving(studio, task_run, language_run, *a, **kw):  # the real one's look-ups, a stand-in model
        studio.run_vector_dir(task_run, "task vector")
        if language_run:
            studio.run_vector_dir(language_run, "language vector")
        return (None, None, ["negative", "positive"]), True

    scores = inference.evaluate_task_data

    def deleted_while_scoring(*a, **kw):
        if studio.registry.get(task):
            studio.registry.delete(task)
        return scores(*a, **kw)

    monkeypatch.setattr(predict, "composed", resolving)
    monkeypatch.setattr(inference, "evaluate_task_data", deleted_while_scoring)
    f = studio.home / "eval.csv"
    f.write_text("text,label\ngood,positive\nbad,negative\n")
    msg, *_ = api(studio)["evaluate"](task, lang, None, str(f), "", "", "label")
    assert "unexpected error" not in msg and "task only" in msg and "macro-F1" in msg, msg
    assert studio.registry.get(task) is None and "metrics" in studio.registry.get(lang)["config"]
