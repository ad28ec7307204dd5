"""RunDir (the run folder: claim, status, metrics, failure marking) and StopFlag (signals -> a flag)."""
import json
import os
import signal

import pytest

from deftx_engine.errors import ConfigError, DeftxError
from deftx_engine.training.runs import RunDir, StopFlag, read_json

CONFIG = {"kind": "language", "data": "corpus.txt", "k": 0.028}


def test_claim_a_new_folder_writes_the_configuration(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.claim(CONFIG, resume=False, overwrite=False) is False
    assert read_json(run.config_file) == CONFIG


def test_claim_refuses_the_same_run_without_resume_and_a_different_run_without_overwrite(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim(CONFIG, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="already holds this run; pass --resume"):
        run.claim(CONFIG, resume=False, overwrite=False)
    assert run.claim(CONFIG, resume=True, overwrite=False) is True
    other = {**CONFIG, "k": 0.05}
    with pytest.raises(ConfigError, match="holds a different run"):
        run.claim(other, resume=True, overwrite=False)
    assert read_json(run.config_file) == CONFIG  # the refused claim changed nothing


def test_overwrite_empties_the_folder_first(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim(CONFIG, resume=False, overwrite=False)
    (run.path / "phase1").mkdir()
    run.log_file.write_text("old log\n")
    other = {**CONFIG, "k": 0.05}
    assert run.claim(other, resume=False, overwrite=True) is False
    assert sorted(p.name for p in run.path.iterdir()) == [".lock", "run.json"]  # the lock this process holds
    assert read_json(run.config_file) == other


def test_require_run_names_a_folder_without_a_run(tmp_path):
    """A claimed run passes; an absent folder, a folder of other files, or one holding only a front end's
    config.json (a queued run; accepted with ``queued``, as --resume does) is refused naming it."""
    run = RunDir(tmp_path / "run")
    with pytest.raises(DeftxError, match=f"--run {run.path} does not exist"):
        run.require_run("--run")
    run.path.mkdir()
    run.submitted_file.write_text("{}")
    with pytest.raises(DeftxError, match=r"is not a DeFT-X run folder \(it has no run.json\)\. Try again\.$"):
        run.require_run("--run", hint="Try again.")
    run.require_run("--resume", queued=True)
    run.submitted_file.unlink()
    run.claim(CONFIG, resume=False, overwrite=False)
    run.require_run("--run")


def test_status_updates_are_whole_files_and_accumulate(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim(CONFIG, resume=False, overwrite=False)
    run.update(state="running", phase="full", total_steps=10)
    run.update(step=3, loss=1.5)
    status = json.loads(run.status_file.read_text())
    assert {k: status[k] for k in ("state", "phase", "step", "total_steps", "loss")} == \
        {"state": "running", "phase": "full", "step": 3, "total_steps": 10, "loss": 1.5}
    assert status["pid"] == os.getpid() and status["updated"] >= status["started"]
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == [".lock"]  # no temporary files left
    again = RunDir(run.path)  # a new process (resume) continues from what is on disk
    again.update(step=4)
    assert again.status()["phase"] == "full" and again.status()["step"] == 4


def test_metrics_lines_and_a_half_written_line(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim(CONFIG, resume=False, overwrite=False)
    assert run.metrics() == []
    run.log_metrics({"phase": "full", "step": 1, "loss": 2.0})
    run.log_metrics({"phase": "full", "step": 2, "loss": 1.0})
    with open(run.metrics_file, "a") as f:
        f.write('{"phase": "sparse", "st')  # being written right now
    rows = run.metrics()
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.0)] and all("time" in r for r in rows)


def test_record_failure_marks_failed_or_cancelled_and_reraises(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim(CONFIG, resume=False, overwrite=False)
    with pytest.raises(ValueError), run.record_failure():
        raise ValueError("bad value")
    assert run.status()["state"] == "failed" and run.status()["message"] == "ValueError: bad value"
    with pytest.raises(KeyboardInterrupt), run.record_failure():
        raise KeyboardInterrupt
    assert run.status()["state"] == "cancelled"
    run.log_file.write_text("".join(f"line {i}\n" for i in range(50)))
    assert run.log_tail(2) == "line 48\nline 49"
    assert RunDir(tmp_path / "missing").log_tail() == ""


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_stop_flag_turns_a_signal_into_a_flag_and_a_second_one_into_an_interrupt(restore_signals):
    stop = StopFlag().install()
    assert not stop and stop.signal is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop and stop.signal == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_other_files_is_never_claimed(tmp_path, overwrite):
    """Issue 11 #6: --output-dir naming a folder of unrelated files (or a file) is refused, with or without
    --overwrite, and nothing in it is touched; a folder holding only what a run writes is taken."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a DeFT-X run .*thesis.tex"):
        RunDir(folder).claim(CONFIG, resume=False, overwrite=overwrite)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        RunDir(a_file).claim(CONFIG, resume=False, overwrite=overwrite)
    started = tmp_path / "queued"  # the app writes these before the run's process claims the folder
    started.mkdir()
    (started / "process.log").write_text("")
    assert RunDir(started).claim(CONFIG, resume=False, overwrite=overwrite) is False


def test_a_run_folder_deleted_mid_run_is_an_error_not_recreated(tmp_path):
    """Issue 11 #15: status updates after the run folder vanished raise instead of making it again."""
    import shutil

    from deftx_engine.errors import DeftxError

    run = RunDir(tmp_path / "run")
    run.claim(CONFIG, resume=False, overwrite=False)
    run.update(state="running", step=1)
    shutil.rmtree(run.path)
    with pytest.raises(DeftxError, match="deleted while the run was going"):
        run.update(state="done")
    assert not run.path.exists()


def test_a_run_recorded_before_a_field_existed_resumes(tmp_path):
    from deftx_engine.training.config import TrainConfig

    config = TrainConfig(kind="task", data="x.csv").to_dict()
    before = {k: v for k, v in config.items() if k != "param_groups"}  # written before the field was added
    run = RunDir(tmp_path / "r")
    run.claim(before, resume=False, overwrite=False)
    assert run.claim(config, resume=True, overwrite=False) is True
    with pytest.raises(ConfigError, match="holds a different run"):
        run.claim({**config, "param_groups": "ffn"}, resume=True, overwrite=False)  # not the default: another run
    with pytest.raises(ConfigError, match="holds a different run"):
        run.claim({k: v for k, v in config.items() if k != "seed"}, resume=True, overwrite=False)


def test_a_folder_another_live_process_writes_is_refused(tmp_path):
    """One writer per run folder, enforced by a lock the kernel drops when the writer dies (kill -9 too)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    code = ("import sys, time; from deftx_engine.training.runs import RunDir; "
            "RunDir(sys.argv[1]).claim({'a': 1}, resume=False, overwrite=False); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        assert RunDir(run).writer() == f"pid {holder.pid}"
        for kw in (dict(resume=True, overwrite=False), dict(resume=False, overwrite=True)):
            with pytest.raises(ConfigError, match=f"another training process \\(pid {holder.pid}\\)"):
                RunDir(run).claim({"a": 1}, **kw)
        assert json.loads((run / "run.json").read_text()) == {"a": 1}  # --overwrite deleted nothing
    finally:
        holder.kill()
        holder.wait()
    assert RunDir(run).writer() is None
    assert RunDir(run).claim({"a": 1}, resume=True, overwrite=False) is True
