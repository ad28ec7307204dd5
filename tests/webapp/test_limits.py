"""Issue 6, limits of a shared deployment: each is an environment variable, and exceeding it gives a message.

DEFTX_MAX_UPLOAD_MB (Gradio's upload route and the app's own copy), DEFTX_MAX_LINES (Data tab, Start,
Predict files), DEFTX_MAX_STEPS (explicit steps and epochs turned into steps), DEFTX_MAX_JOBS (runs at once;
the others wait in order) and DEFTX_MAX_QUEUE (runs waiting); a malformed value is a message too (inline per
request, and one line at start-up). Through the app's handlers (called directly) and, for uploads, a launched
app.
"""
import os
import time
from pathlib import Path

import pytest

from tiny import ASSETS

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
LIMITS = ("DEFTX_MAX_UPLOAD_MB", "DEFTX_MAX_LINES", "DEFTX_MAX_STEPS", "DEFTX_MAX_QUEUE", "DEFTX_MAX_JOBS",
          "DEFTX_AUTH")
ERR = "<span class='dx-err'>"


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.setenv("DEFTX_WARMUP", "0")
    for var in LIMITS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def app(tmp_path, clean_env):
    """A started app's state (its handlers need no page)."""
    from webapp.state import Studio

    studio = Studio(tmp_path / "home").start()
    yield studio
    studio.registry.shutdown(cancel_running=True)


def train(fns, data=ASSETS / "target_corpus_id.txt", kind="language", base="minilm", full=2, sparse=2, epochs=1.0,
          bs=8):
    return fns["start_training"](
        kind=kind, base_model=base, data=str(data), language="id", name="limit", method="deftx",
        rank_policy="energy", energy=0.9, rank=100, residual_share=0.05, k_percent=5, full_steps=full,
        sparse_steps=sparse, epochs=epochs, lr=1e-3, batch_size=bs, max_length=32, seed=1, text_column="",
        pair_column="", label_column="label", preset="custom", k_exact_value=None)


def refused(msg: str, *words: str) -> None:
    assert msg.startswith(ERR) and "unexpected error" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_upload_size(app, clean_env, tmp_path, api, free_port):
    from gradio_client import Client, handle_file

    from webapp.settings import launch_kwargs
    from webapp.ui import build_app

    big = tmp_path / "big.txt"
    big.write_text("Saya suka makan nasi goreng.\n" * 2000, encoding="utf-8")  # 58 kB
    clean_env.setenv("DEFTX_MAX_UPLOAD_MB", "0.01")  # 10 kB
    msg, *_ = api(app)["validate_data"]("corpus", str(big), "", "", "", "label")
    refused(msg, "big.txt", "over the upload limit of 0.01 MB", "DEFTX_MAX_UPLOAD_MB")
    assert not [p for p in app.uploads.iterdir()], "an over-limit upload must not be stored"

    demo = build_app(app)  # Gradio's own limit, from the same variable, before the file reaches the app
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **launch_kwargs(app.home))
    try:
        c = Client(demo.local_url, verbose=False)
        with pytest.raises(Exception) as e:
            c.predict("corpus", handle_file(str(big)), "", "", "", "label", api_name="/validate_data")
        assert "413" in str(e.value) or "size" in str(e.value).lower(), str(e.value)[:300]
        small = tmp_path / "small.txt"
        small.write_text("Saya suka makan.\n", encoding="utf-8")
        msg, *_ = c.predict("corpus", handle_file(str(small)), "", "", "", "label", api_name="/validate_data")
        assert "1 lines" in msg  # the app still answers
    finally:
        demo.close()


def test_max_lines(app, clean_env, api):
    fns = api(app)
    clean_env.setenv("DEFTX_MAX_LINES", "100")
    msg, *_ = fns["validate_data"]("corpus", None, str(ASSETS / "target_corpus_id.txt"), "", "", "label")
    refused(msg, "400 lines, more than the limit of 100", "DEFTX_MAX_LINES")
    msg, *_ = fns["validate_data"]("task", None, str(ASSETS / "source_task_en.csv"), "", "", "label")
    refused(msg, "300 rows, more than the limit of 100", "DEFTX_MAX_LINES")
    msg, run_id, *_ = train(fns)
    refused(msg, "more than the limit of 100")
    assert not isinstance(run_id, str) and app.registry.list() == []
    clean_env.setenv("DEFTX_MAX_LINES", "400")  # exactly at the limit is fine
    msg, *_ = fns["validate_data"]("corpus", None, str(ASSETS / "target_corpus_id.txt"), "", "", "label")
    assert "400 lines" in msg and not msg.startswith(ERR)


def test_max_steps(app, clean_env, api):
    fns = api(app)
    clean_env.setenv("DEFTX_MAX_STEPS", "50")
    msg, *_ = train(fns, full=60, sparse=10)
    refused(msg, "at most 50 steps per phase", "DEFTX_MAX_STEPS")
    # 300 task rows, batch 8: 38 steps per epoch, 3 epochs = 114 steps
    msg, *_ = train(fns, data=ASSETS / "source_task_en.csv", kind="task", full=0, sparse=0, epochs=3.0)
    refused(msg, "phase 1 would take 114 steps", "DEFTX_MAX_STEPS")
    msg, *_ = train(fns, data="hub:org/data", full=0, sparse=10)
    refused(msg, "give the phase-1 and phase-2 steps (not epochs)")
    assert app.registry.list() == []


def test_max_jobs_and_queue(tmp_path, clean_env, api):
    """One job at a time (DEFTX_MAX_JOBS=1): the second waits as #1; with DEFTX_MAX_QUEUE=1 a third Start and
    a Resume are refused while one run waits."""
    from webapp.state import Studio

    clean_env.setenv("DEFTX_MAX_JOBS", "1")
    clean_env.setenv("DEFTX_MAX_QUEUE", "1")
    tiny = "minilm"  # never loaded: see the stand-in below
    # the jobs' "python" is a stand-in that just waits (training itself is not what is tested here)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    clean_env.setattr("sys.executable", str(fake))
    studio = Studio(tmp_path / "home").start()
    reg = studio.registry
    try:
        fns = api(studio)
        msg1, first, *_ = train(fns, base=tiny, full=500, sparse=500)
        assert "started" in msg1, msg1
        msg2, second, *_ = train(fns, base=tiny, full=500, sparse=500)
        assert "queued (#1)" in msg2 and reg.get(second)["state"] == "queued", msg2
        msg3, third, *_ = train(fns, base=tiny, full=500, sparse=500)
        refused(msg3, "the queue is full", "DEFTX_MAX_QUEUE")
        assert not isinstance(third, str) and len(reg.list()) == 2
        fns["cancel_run"](first)
        reg.wait(first, timeout=60)
        end = time.time() + 10
        while reg.get(second)["state"] == "queued" and time.time() < end:
            time.sleep(0.1)  # the free slot goes to the waiting run
        assert reg.get(second)["state"] == "running"
        msg, third, *_ = train(fns, base=tiny, full=500, sparse=500)  # waits as #1 again
        assert "queued (#1)" in msg, msg
        msg, *_ = fns["resume_run"](first)  # a resume is a start too: refused while the queue is full
        refused(msg, "the queue is full")
        assert reg.get(first)["state"] == "cancelled"
    finally:
        reg.shutdown(cancel_running=True)
        for row in reg.list(states=["queued"]):
            reg.cancel(row["id"])


@pytest.mark.parametrize("var,value,says", [("DEFTX_MAX_LINES", "abc", "a whole number"),
                                            ("DEFTX_MAX_LINES", "0", "at least 1"),
                                            ("DEFTX_MAX_UPLOAD_MB", "-5", "at least"),
                                            ("DEFTX_MAX_UPLOAD_MB", "nan", "at least"),
                                            ("DEFTX_MAX_STEPS", "1e3", "a whole number"),
                                            ("DEFTX_MAX_QUEUE", "many", "a whole number"),
                                            ("DEFTX_MAX_JOBS", "x", "a whole number")])
def test_malformed_limits_are_messages(app, clean_env, tmp_path, api, var, value, says):
    import app as app_module
    from deftx_engine.errors import ConfigError
    from webapp.state import Studio

    clean_env.setenv(var, value)
    if var != "DEFTX_MAX_JOBS":  # read per request (DEFTX_MAX_JOBS only when the registry starts)
        fns = api(app)
        upload = tmp_path / "corpus.txt"
        upload.write_text("Saya suka makan.\n", encoding="utf-8")
        msg, *_ = (fns["validate_data"]("corpus", str(upload), "", "", "", "label")
                   if var == "DEFTX_MAX_UPLOAD_MB" else train(fns))
        refused(msg, var, says)
    with pytest.raises(ConfigError, match=var):
        Studio(tmp_path / "other")
    clean_env.setenv("DEFTX_HOME", str(tmp_path / "other"))
    with pytest.raises(SystemExit) as e:
        app_module.main()
    assert var in str(e.value) and says in str(e.value)


@pytest.mark.parametrize("var,value,says", [("DEFTX_LOG_LEVEL", "BOGUS", "not a log level"),
                                            ("GRADIO_SERVER_PORT", "abc", "a whole number")])
def test_a_bad_log_level_or_port_stops_the_app_with_one_line(var, value, says):
    """Read before Gradio is imported (which reads GRADIO_SERVER_PORT itself, with a traceback)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, var: value, "DEFTX_WARMUP": "0"}
    proc = subprocess.run([sys.executable, str(root / "app.py")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and var in proc.stderr and says in proc.stderr
