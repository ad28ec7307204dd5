"""Issue 6, faults at the app level: SIGKILL a training process the app started, restart the app, resume.

Through the app's own handlers (the module-level functions behind the `start_training`, `run_status` and
`resume_run` API names, called directly), on a tiny random BERT (tests/tiny.py), no network:

1. the app starts a task SFT (the *victim*) and the same settings again (the *reference*, seed 7, run to the
   end undisturbed; DEFTX_MAX_JOBS=2 so both run at once);
2. kill 1, phase 1: once the victim has written a phase-1 checkpoint, its process group gets SIGKILL while
   the app runs; the app reaps it as `interrupted` (killed from outside, so resumable), and the app restarts
   (a new Studio and registry on the same DEFTX_HOME) and still shows `interrupted`;
3. Resume queues the same run (same id, same folder) with `--resume`: it continues phase 1 from the checkpoint;
   kill 2, phase 2: 2 steps into the sparse phase, the app "crashes" first (its scheduler stops) and then
   the job gets SIGKILL; the next app start finds the process gone and marks the run `interrupted`;
4. Resume again: the run finishes (phase 1 skipped: the mask was saved), and its vector equals the
   reference's: same indices, values and heads within 1e-6.

Engine-level counterparts (not repeated here): tests/engine/training/test_train.py (SIGKILL in each phase + --resume,
SIGTERM cancel, full disk via RLIMIT_FSIZE) and tests/engine/method/test_vectors.py::test_save_is_atomic.
"""
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tiny import ASSETS, make_tiny_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
FAULTS = {"sigkill": 0, "app_restarts": 0}


def build(home):
    """An app starting: its state and services (the page is not needed to call its handlers)."""
    from webapp.state import Studio

    return Studio(home).start()


def restart(old, home):
    """An app restart: the old app's scheduler goes away (its jobs keep running in their own sessions)."""
    old.registry.stop()
    FAULTS["app_restarts"] += 1
    return build(home)


def start(fns, tiny, name, seed=7):
    msg, run_id, *_ = fns["start_training"](
        kind="task", base_model=tiny, data=str(ASSETS / "source_task_en.csv"), language="en", name=name,
        method="deftx", rank_policy="energy", energy=0.9, rank=100, residual_share=0.05, k_percent=5,
        full_steps=100, sparse_steps=100, epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=seed,
        text_column="", pair_column="", label_column="label",
        preset="cpu-demo",  # its save_steps (50) and logging_steps (5); every other value is explicit
        k_exact_value=None)
    assert isinstance(run_id, str) and run_id, msg
    return run_id


def wait_for(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def checkpoint(run_dir: Path, phase: str):
    """The newest complete checkpoint of a phase (Trainer writes trainer_state.json last)."""
    done = [p for p in (run_dir / phase).glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def sigkill(pid: int) -> None:
    FAULTS["sigkill"] += 1
    try:
        os.killpg(pid, signal.SIGKILL)  # the whole job (its own session), as a crash or the OOM killer would
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def test_sigkill_restart_resume_gives_the_same_vector(tmp_path, tiny, monkeypatch, api):
    from deftx_engine.method.vectors import SparseVector
    from deftx_engine.training.runs import RunDir
    from webapp.rundb import process_argv

    monkeypatch.setenv("DEFTX_WARMUP", "0")
    monkeypatch.setenv("DEFTX_MAX_JOBS", "2")
    monkeypatch.setenv("DEFTX_DATA_DIRS", str(Path(tiny).parent))  # a local base model must lie in an allowed folder
    home = tmp_path / "home"
    app = build(home)
    try:
        fns = api(app)
        victim = start(fns, tiny, "victim")
        reference = start(fns, tiny, "reference")
        reg = app.registry
        run_dir = Path(reg.get(victim)["run_dir"])

        # ---- kill 1: phase 1, while the app watches
        wait_for(lambda: checkpoint(run_dir, "phase1"), 180, "a phase-1 checkpoint of the victim")
        row = reg.get(victim)
        assert row["state"] == "running" and not (run_dir / "mask.safetensors").exists(), "phase 1 already over"
        sigkill(row["pid"])
        row = wait_for(lambda: (r := reg.get(victim))["state"] != "running" and r, 30, "the app to reap the run")
        assert row["state"] == "interrupted", row
        assert "SIGKILL" in row["message"] and "resume" in row["message"]
        assert not (run_dir / "vector").exists()

        app = restart(app, home)
        fns = api(app)
        st = fns["run_status"](victim)
        assert st["state"] == "interrupted", st

        # ---- resume, then kill 2: phase 2, after the app itself went away
        msg, *_ = fns["resume_run"](victim)
        assert "continues from its last checkpoint" in msg, msg
        reg = app.registry
        row = reg.get(victim)
        assert row["id"] == victim and process_argv(row)[-1] == "--resume" and row["run_dir"] == str(run_dir)
        wait_for(lambda: (st := RunDir(run_dir).status()).get("phase") == "sparse" and st.get("step", 0) >= 102,
                 180, "the resumed victim to be 2 steps into phase 2")
        row = reg.get(victim)
        assert row["state"] == "running" and not (run_dir / "vector").exists(), "phase 2 already over"
        pid = row["pid"]
        reg.stop()  # the app crashes ...
        FAULTS["app_restarts"] += 1
        sigkill(pid)  # ... and so does its job
        if victim in reg._procs:
            reg._procs[victim].wait(timeout=30)  # reap the zombie (a real crash leaves none behind)
        app = build(home)
        fns = api(app)
        st = fns["run_status"](victim)
        assert st["state"] == "interrupted", st
        assert "resume" in st["message"]

        # ---- resume again: finishes, equal to the uninterrupted reference
        msg, *_ = fns["resume_run"](victim)
        assert "continues from its last checkpoint" in msg, msg
        reg = app.registry
        for rid in (reference, victim):
            row = reg.wait(rid, timeout=240)
            assert row["state"] == "done", row
        log = (run_dir / "log.txt").read_text(encoding="utf-8")
        assert "resumed: mask found, phase 1 skipped" in log
        assert not (run_dir / "phase1").exists(), "checkpoints are deleted once the vector is saved"
        msg, *_ = fns["resume_run"](victim)  # a finished run cannot be resumed: a message, not a crash
        assert "done" in msg and "can be resumed" in msg

        a = SparseVector.load(Path(reg.get(reference)["vector_dir"]))
        b = SparseVector.load(Path(reg.get(victim)["vector_dir"]))
        assert a.nnz == b.nnz > 0 and a.indices.keys() == b.indices.keys() and a.heads.keys() == b.heads.keys()
        for n in a.indices:
            assert torch.equal(a.indices[n], b.indices[n]), n
            assert torch.allclose(a.values[n], b.values[n], atol=1e-6), n
        for n in a.heads:
            assert torch.allclose(a.heads[n], b.heads[n], atol=1e-6), n
        print(f"\nfaults injected: {FAULTS['sigkill']} SIGKILL (phase 1 with the app up, phase 2 with the app "
              f"down), {FAULTS['app_restarts']} app restarts; resumed vector == reference "
              f"({a.nnz:,} entries, atol 1e-6)")
    finally:
        app.registry.shutdown(cancel_running=True)
