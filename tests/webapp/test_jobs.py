"""The web app's job registry (webapp/jobs.py) with a fake job: a tiny Python script that writes status.json.

No model, no network: each fake job lives well under a second unless a test wants it to linger.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from webapp.jobs import JobRegistry
from webapp.processes import is_alive, process_start

# argv: run_dir mode seconds (``stand_in``). Modes: ok (steps then done), fail (CLI-style error, exit 2), stubborn
# (ignores SIGTERM), sleep (never writes a final state). Every start appends a line to <run_dir>/starts.txt.
FAKE = r"""
import json, os, signal, sys, time
run, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.makedirs(run, exist_ok=True)
with open(os.path.join(run, "starts.txt"), "a") as f:
    f.write(f"{os.getpid()} {time.time()}\n")
def status(state, step, msg=""):
    tmp = os.path.join(run, ".status.tmp")
    with open(tmp, "w") as f:
        json.dump({"state": state, "phase": "full", "step": step, "total_steps": 5, "message": msg,
                   "pid": os.getpid(), "updated": time.time()}, f)
    os.replace(tmp, os.path.join(run, "status.json"))
stop = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else (lambda *a: stop.append(1)))
if mode == "fail":
    print("Traceback (most recent call last):\n  File x\nValueError: inner detail")
    print("deftx: error: data.csv line 7: field 'label' is empty", file=sys.stderr)
    sys.exit(2)
end = time.time() + seconds
step = 0
while time.time() < end:
    if stop:
        status("cancelled", step, "stopped by a signal")
        sys.exit(143)
    step += 1
    status("running", min(step, 5))
    time.sleep(0.05)
if mode in ("sleep", "stubborn"):
    sys.exit(0)
status("done", 5, "vector saved")
"""


def stand_in(reg, mode="ok", seconds=0.2, script=FAKE) -> tuple[str, list[str]]:
    """(run id, argv) of a fake job: the registry runs a stand-in's argv as given, so the argv names the run
    folder of the id it will be queued under."""
    run_id = reg.new_id()
    return run_id, [sys.executable, "-c", script, str(reg.run_dir(run_id)), mode, str(seconds)]


def submit_fake(reg, name, kind, mode="ok", seconds=0.2, script=FAKE) -> str:
    run_id, argv = stand_in(reg, mode, seconds, script)
    return reg.submit(name, kind, argv, run_id=run_id)


@pytest.fixture
def reg(tmp_path):
    r = JobRegistry(tmp_path, max_concurrent=1, poll=0.05, grace=1.0)
    yield r
    r.shutdown(cancel_running=True)


def wait_for(pred, timeout=20.0, tick=None):
    end = time.time() + timeout
    while time.time() < end:
        if tick:
            tick()
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached within %.0fs" % timeout)


def test_runs_in_fifo_order_one_at_a_time(reg):
    ids = [submit_fake(reg, f"job{i}", "language", "ok", 0.2) for i in range(3)]
    assert [reg.get(i)["state"] for i in ids] == ["queued"] * 3
    assert [reg.queue_position(i) for i in ids] == [1, 2, 3]
    reg.start()
    rows = [reg.wait(i, timeout=30) for i in ids]
    assert [r["state"] for r in rows] == ["done"] * 3
    assert rows[0]["started"] < rows[1]["started"] < rows[2]["started"]
    for a, b in zip(rows, rows[1:]):
        assert a["finished"] <= b["started"], "a second job started while the first was running"
    assert rows[0]["step"] == 5 and rows[0]["total_steps"] == 5 and rows[0]["message"] == "vector saved"
    assert rows[0]["exit_code"] == 0
    # the list is newest first
    assert [r["id"] for r in reg.list()] == ids[::-1]


def test_max_concurrent_two(tmp_path):
    reg = JobRegistry(tmp_path, max_concurrent=2, poll=0.05)
    try:
        ids = [submit_fake(reg, f"j{i}", "task", "ok", 1.0) for i in range(3)]
        reg.tick()
        assert [reg.get(i)["state"] for i in ids] == ["running", "running", "queued"]
        reg.start()
        rows = [reg.wait(i, timeout=30) for i in ids]
        assert all(r["state"] == "done" for r in rows)
        assert rows[2]["started"] >= min(rows[0]["finished"], rows[1]["finished"])
    finally:
        reg.shutdown(cancel_running=True)


def test_env_default_is_one_job(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFTX_MAX_JOBS", raising=False)
    assert JobRegistry(tmp_path / "a").max_concurrent == 1
    monkeypatch.setenv("DEFTX_MAX_JOBS", "3")
    assert JobRegistry(tmp_path / "b").max_concurrent == 3


def test_cancel_queued_is_immediate(reg):
    first = submit_fake(reg, "first", "language", "ok", 1.0)
    second = submit_fake(reg, "second", "language", "ok", 0.1)
    reg.tick()
    assert reg.cancel(second) == "cancelled"
    row = reg.get(second)
    assert row["state"] == "cancelled" and row["pid"] is None
    reg.start()
    assert reg.wait(first, timeout=30)["state"] == "done"
    time.sleep(0.3)
    assert reg.get(second)["state"] == "cancelled"
    assert not (reg.runs_root / second / "starts.txt").exists(), "a cancelled queued run was started"


def test_cancel_running_sends_sigterm(reg):
    rid = submit_fake(reg, "long", "language", "ok", 60)
    reg.start()
    wait_for(lambda: reg.get(rid)["step"] >= 1)
    t0 = time.time()
    assert reg.cancel(rid) == "running"
    row = reg.wait(rid, timeout=15)
    assert row["state"] == "cancelled"
    assert row["exit_code"] == 143
    assert row["message"] == "stopped by a signal"
    assert time.time() - t0 < 5


def test_cancel_escalates_to_sigkill(reg):
    rid = submit_fake(reg, "stubborn", "language", "stubborn", 60)
    reg.start()
    wait_for(lambda: reg.get(rid)["step"] >= 1)
    pid = reg.get(rid)["pid"]
    reg.cancel(rid)
    row = reg.wait(rid, timeout=15)  # grace is 1 s
    assert row["state"] == "cancelled"
    assert row["exit_code"] == -signal.SIGKILL
    assert not is_alive(pid, None)


def test_failure_without_final_state(reg):
    rid = submit_fake(reg, "bad", "task", "fail")
    reg.start()
    row = reg.wait(rid, timeout=15)
    assert row["state"] == "failed"
    assert row["exit_code"] == 2
    assert row["message"] == "data.csv line 7: field 'label' is empty"  # the CLI's message, no traceback


def test_exit_zero_without_final_state_is_a_failure(reg):
    rid = submit_fake(reg, "quiet", "task", "sleep", 0.1)
    reg.start()
    row = reg.wait(rid, timeout=15)
    assert row["state"] == "failed" and "without reporting a result" in row["message"]


def test_command_that_cannot_start(reg):
    rid = reg.submit("missing", "task", ["/nonexistent/python"])
    reg.tick()
    row = reg.get(rid)
    assert row["state"] == "failed" and "could not start" in row["message"]


def test_restart_marks_gone_runs_interrupted(tmp_path):
    a = JobRegistry(tmp_path, poll=0.05)
    rid = submit_fake(a, "orphan", "language", "sleep", 60)
    a.tick()
    row = a.get(rid)
    assert row["state"] == "running" and is_alive(row["pid"], row["pid_start"])
    a.stop()  # the app goes away; its job keeps running in its own session
    b = JobRegistry(tmp_path, poll=0.05)
    assert b.recover() == [], "a run whose process is still alive must not be touched"
    os.kill(row["pid"], signal.SIGKILL)  # ... then the job dies while no app is watching
    a._procs[rid].wait()
    c = JobRegistry(tmp_path, poll=0.05)
    assert c.recover() == [rid]
    row = c.get(rid)
    assert row["state"] == "interrupted" and row["finished"] is not None


def test_restart_detects_a_reused_pid(tmp_path):
    a = JobRegistry(tmp_path)
    rid = submit_fake(a, "reused", "language", "sleep", 60)
    a.stop()
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:  # a pid that now belongs to another process
        db.execute("UPDATE runs SET state='running', pid=?, pid_start='1', owner='1:1:gone' WHERE id=?",
                   (os.getpid(), rid))
    b = JobRegistry(tmp_path)
    assert b.recover() == [rid]
    assert b.get(rid)["state"] == "interrupted"


def test_restart_keeps_watching_a_live_job(tmp_path):
    a = JobRegistry(tmp_path, poll=0.05)
    rid = submit_fake(a, "survivor", "language", "ok", 1.5)
    a.tick()
    a.stop()  # app restart while the job runs
    b = JobRegistry(tmp_path, poll=0.05).start()
    try:
        row = b.wait(rid, timeout=20)
        assert row["state"] == "done"  # its final status.json, read by the new app
    finally:
        b.stop()
        a._procs[rid].wait()


def test_two_registries_share_one_file(tmp_path):
    """Two app processes' registries on one SQLite file: no run starts twice, at most one runs at a time,
    concurrent submits lose nothing."""
    a = JobRegistry(tmp_path, max_concurrent=1, poll=0.02)
    b = JobRegistry(tmp_path, max_concurrent=1, poll=0.02)
    ids: list[str] = []
    lock = threading.Lock()

    def submit_many(reg, n):
        for i in range(n):
            rid = submit_fake(reg, f"c{i}", "task", "ok", 0.05)
            with lock:
                ids.append(rid)

    threads = [threading.Thread(target=submit_many, args=(r, 4)) for r in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 16 and len(set(ids)) == 16
    assert len(a.list()) == len(b.list()) == 16
    a.start()
    b.start()
    try:
        rows = [a.wait(i, timeout=120) for i in ids]
    finally:
        a.stop()
        b.stop()
    assert all(r["state"] == "done" for r in rows)
    for r in rows:
        starts = (tmp_path / "runs" / r["id"] / "starts.txt").read_text().splitlines()
        assert len(starts) == 1, f"run {r['id']} started {len(starts)} times"
    spans = sorted((r["started"], r["finished"]) for r in rows)
    for (s1, f1), (s2, f2) in zip(spans, spans[1:]):
        assert f1 <= s2, "two runs ran at once with max_concurrent=1"
    # both registries' processes were reaped by the one that started them: exit codes are known
    assert all(r["exit_code"] == 0 for r in rows)
    assert {r["owner"] for r in rows} <= {a.identity, b.identity}


def test_pulled_vectors_are_done_runs(reg, tmp_path):
    rid = reg.add_vector("lt-sft-sw", "language", tmp_path / "v", config={"source": "org/repo"})
    row = reg.get(rid)
    assert row["state"] == "done" and row["vector_dir"] == str(tmp_path / "v")
    assert row["config"] == {"source": "org/repo"}
    reg.tick()  # the scheduler leaves it alone
    assert reg.get(rid)["state"] == "done"


def test_process_identity():
    me = process_start(os.getpid())
    assert me is not None and is_alive(os.getpid(), me)
    assert not is_alive(os.getpid(), "0")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not is_alive(p.pid, None)


def test_registry_survives_corrupt_status(reg):
    rid = submit_fake(reg, "garbled", "task", script="import sys,os; os.makedirs(sys.argv[1], exist_ok=True); "
                      "open(os.path.join(sys.argv[1], 'status.json'), 'w').write('{not json')")
    reg.start()
    row = reg.wait(rid, timeout=15)
    assert row["state"] == "failed"
    assert json.loads(json.dumps(row["config"])) == {}


# a job that holds its run folder's lock (as the training CLI does) and reports a step SQLite cannot store
LOCKED_OVERFLOW = r"""
import json, os, sys, time
from deftx_engine.training.runs import RunDir
run = RunDir(sys.argv[1])
run.path.mkdir(parents=True, exist_ok=True)
run.lock()
with open(run.status_file, "w") as f:
    json.dump({"state": "running", "phase": "full", "step": 2 ** 70, "total_steps": 5, "pid": os.getpid(),
               "updated": time.time()}, f)
time.sleep(float(sys.argv[3]))
"""
HOLD = ("import sys, time; from deftx_engine.training.runs import RunDir; RunDir(sys.argv[1]).lock(); "
        "print('held', flush=True); time.sleep(60)")


def test_a_run_marked_failed_has_no_live_writer_and_resume_never_starts_a_second(reg):
    from deftx_engine.training.runs import RunDir

    rid = submit_fake(reg, "overflow", "task", seconds=60, script=LOCKED_OVERFLOW)
    reg.start()
    row = reg.wait(rid, timeout=20)
    assert row["state"] == "failed" and "could not record this run's progress" in row["message"]
    folder = RunDir(row["run_dir"])
    wait_for(lambda: folder.writer() is None, timeout=10)  # its process was killed with it: the lock is free
    # a live writer, whatever the registry says (here: a process the registry never started), blocks resume
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder.path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(ValueError, match=f"still has a live training process \\(pid {holder.pid}\\)"):
            reg.resume(rid)
        assert reg.get(rid)["state"] == "failed"
    finally:
        holder.kill()
        holder.wait()
    assert reg.resume(rid)["state"] == "queued"


def test_resume_of_a_run_whose_folder_was_deleted_or_emptied_is_refused_at_once(reg):
    """The folder gone (or emptied) behind the registry's back: Resume says so and queues nothing, instead of
    starting a process that fails later naming a log that no longer exists."""
    import shutil

    rid = submit_fake(reg, "gone", "task", "fail")
    reg.start()
    row = reg.wait(rid, timeout=20)
    assert row["state"] == "failed"
    (Path(row["run_dir"]) / "config.json").unlink()  # emptied: a folder, but no run in it
    with pytest.raises(ValueError, match="is not a DeFT-X run folder.*nothing to resume"):
        reg.resume(rid)
    shutil.rmtree(row["run_dir"])
    with pytest.raises(ValueError, match="does not exist \\(was it deleted\\?\\).*nothing to resume"):
        reg.resume(rid)
    assert reg.get(rid)["state"] == "failed" and reg.queue_position(rid) is None


# ---- groups: runs that stand or fall together (the guided demo; issue 20) ---------------------------------
@pytest.mark.parametrize("how", ["cancel", "fail"])
def test_a_group_stops_together(tmp_path, how):
    """Two runs of one group running side by side: cancelling one, or one failing, stops the other (once it
    trained on alone), and the group is no longer under way, so a new one may be queued at once."""
    from webapp.rundb import GroupBusy, Submission

    reg = JobRegistry(tmp_path, max_concurrent=2, poll=0.05, grace=1.0)
    try:
        (id_a, first), (id_b, second) = stand_in(reg, "ok", 60), stand_in(reg, "ok", 60)
        if how == "fail":
            first = [sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(2)"]
        a, b = reg.submit_group("g", [Submission("a", "language", first), Submission("b", "task", second)],
                                run_ids=[id_a, id_b])
        with pytest.raises(GroupBusy):
            reg.submit_group("g", [Submission("c", "task", ["true"])])
        reg.start()
        wait_for(lambda: reg.get(b)["step"] >= 1)
        if how == "cancel":
            assert reg.cancel(a) == "running"
        assert reg.wait(a, timeout=15)["state"] == ("cancelled" if how == "cancel" else "failed")
        assert reg.wait(b, timeout=15)["state"] == "cancelled"
        assert [r["id"] for r in reg.group("g")] == [a, b]  # the newest instance, ended
        c, = reg.submit_group("g", [Submission("c", "task", ["true"])])
        assert [r["id"] for r in reg.group("g")] == [c]
    finally:
        reg.shutdown(cancel_running=True)


def test_group_names_are_made_distinct_in_the_transaction(reg):
    from webapp.rundb import Submission

    ids = reg.submit_group(None, [Submission("x", "task", ["true"])] * 3, distinct=True)
    assert [reg.get(i)["name"] for i in ids] == ["x", "x-2", "x-3"]
    assert reg.get(reg.submit("x", "task", ["true"]))["name"] == "x"  # only when asked


# ---- a training run's process: made from its kind and config file when it starts (issue 23) ------------------
def test_a_training_run_stores_its_config_and_its_argv_is_made_when_it_starts(tmp_path):
    from deftx_engine.training.config import TrainConfig
    from webapp.rundb import RunDB, Submission, process_argv

    reg = RunDB(tmp_path)
    cfg = TrainConfig(kind="task", data="t.csv", language="en")
    rid, = reg.submit_group(None, [Submission("t", "task", config=cfg)])
    row = reg.get(rid)
    run_dir = reg.run_dir(rid)
    assert row["command"] is None and row["config"] == cfg.to_dict()
    assert json.loads((run_dir / "config.json").read_text()) == cfg.to_dict()
    argv = [sys.executable, "-m", "deftx_engine.cli", "train-task", "--config", str(run_dir / "config.json"),
            "--output-dir", str(run_dir)]
    assert process_argv(row) == argv
    with sqlite3.connect(reg.db_path) as db:
        db.execute("UPDATE runs SET state='interrupted' WHERE id=?", (rid,))
    assert process_argv(reg.resume(rid)) == [*argv, "--resume"]
    with pytest.raises(ValueError, match="a config or a command"):
        reg.submit_group(None, [Submission("nothing", "task")])


# the registry table of a version that stored each run's argv (before the resume column)
OLD_SCHEMA = """CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
created REAL NOT NULL, started REAL, finished REAL, pid INTEGER, run_dir TEXT NOT NULL,
config TEXT NOT NULL DEFAULT '{}', message TEXT NOT NULL DEFAULT '', phase TEXT NOT NULL DEFAULT '',
step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, command TEXT, vector_dir TEXT,
pid_start TEXT, owner TEXT, cancel_requested REAL, exit_code INTEGER, queued REAL, grp TEXT)"""
RECORD_ARGV = ("import json, os, sys; open(sys.argv[1] + '.tmp', 'w').write(json.dumps(sys.argv[2:])); "
               "os.replace(sys.argv[1] + '.tmp', sys.argv[1])")


def test_an_old_registry_row_with_a_stored_argv_resumes_with_it(tmp_path):
    """A run interrupted under a version that stored argvs (``--resume`` appended to it on resume) resumes after
    the upgrade: its own argv, with ``--resume``, once."""
    run_dir = tmp_path / "runs" / "old-run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    seen = tmp_path / "argv.json"
    stored = [sys.executable, "-c", RECORD_ARGV, str(seen), "train-language", "--output-dir", str(run_dir)]
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:
        db.execute(OLD_SCHEMA)
        db.execute("INSERT INTO runs (id, name, kind, state, created, run_dir, command, vector_dir) VALUES "
                   "('old-run', 'old', 'language', 'interrupted', 1, ?, ?, ?)",
                   (str(run_dir), json.dumps(stored), str(run_dir / "vector")))
    reg = JobRegistry(tmp_path, poll=0.05)
    try:
        assert reg.resume("old-run")["state"] == "queued"
        reg.tick()
        wait_for(seen.exists)
        assert json.loads(seen.read_text()) == ["train-language", "--output-dir", str(run_dir), "--resume"]
        reg.wait("old-run", timeout=15)
        with sqlite3.connect(reg.db_path) as db:
            db.execute("UPDATE runs SET state='failed' WHERE id='old-run'")
        seen.unlink()
        reg.resume("old-run")  # resumed a second time: --resume once
        reg.tick()
        wait_for(seen.exists)
        assert json.loads(seen.read_text())[-2:] == [str(run_dir), "--resume"]
    finally:
        reg.shutdown(cancel_running=True)
