"""Job registry and scheduler: training runs are OS processes recorded in SQLite (``webapp.rundb``; process
identity, signals and failure messages: ``webapp.processes``).

One table, ``runs``, in ``<DEFTX_HOME>/registry.sqlite3`` (WAL mode, one short-lived connection per call)
records every run: queued, running, finished or pulled from the Hub. Several app processes may share the
file; every state change that must not race (claiming a queued run, finishing a run) is one
``BEGIN IMMEDIATE`` transaction guarded by the current state.

The scheduler thread (``JobRegistry.start``) of each app process, every ``poll`` seconds:

1. reaps the processes it started (``Popen.poll``) and finalises their runs from the run folder's
   ``status.json`` (the only channel from the job; ``deftx_engine.training.runs.RunDir``) and the exit code;
2. mirrors state/phase/step of every running run from ``status.json`` into the registry;
3. finalises runs started by an app process that is gone, once their process is gone too;
4. escalates a cancel to SIGKILL after the grace period;
5. starts queued runs in FIFO order while fewer than ``max_concurrent`` runs are running.

A run whose process ended without a final state is ``failed`` (with the CLI's one-line error), or
``interrupted`` if it was killed by a signal from outside (OOM killer, ``kill -9``) or vanished while no app
watched it. ``resume`` queues an interrupted, cancelled or failed run again, as the same run (id and folder)
with ``--resume``, behind the runs queued before it (queue order is the time of the last (re)queueing).

A process is identified by its pid *and* its start time (``/proc/<pid>/stat``), so a reused pid is
never mistaken for a run's process. Jobs run in their own session (process group): a cancel signals the
whole group, and closing the app does not kill training; a restarted app watches such runs again.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from deftx_engine.training.runs import FINAL_STATES, RunDir

from .processes import (
    LIVE_OWNERS,
    PROCESS_LOG,
    child_env,
    failure_message,
    is_alive,
    owner_alive,
    process_start,
    signal_group,
    signal_name,
)
from .rundb import QUEUE_ORDER, RunDB, process_argv
from .settings import max_jobs

log = logging.getLogger(__name__)


class JobRegistry(RunDB):
    """Runs in SQLite plus a scheduler thread that starts, watches and stops their processes."""

    def __init__(self, home: str | Path, *, max_concurrent: int | None = None, poll: float = 0.5,
                 grace: float = 10.0, db_name: str = "registry.sqlite3"):
        super().__init__(home, db_name)
        if max_concurrent is None:
            max_concurrent = max_jobs()
        self.max_concurrent = max(1, int(max_concurrent))
        self.poll = poll
        self.grace = grace
        self.identity = f"{os.getpid()}:{process_start(os.getpid())}:{secrets.token_hex(4)}"
        LIVE_OWNERS.add(self.identity)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._draining = False  # set by shutdown(): no new process is started

    # ---- cancelling ---------------------------------------------------------------------------------
    def cancel(self, run_id: str) -> str:
        """Queued: cancelled at once. Running: SIGTERM to its process group now, SIGKILL after ``grace``
        seconds if it is still alive. The other runs of its group (``submit_group``: the guided demo) are
        cancelled with it: they stand or fall together. Returns the state of ``run_id`` after the call."""
        with self._transaction() as db:
            row = self._select(db, run_id)
            if row is None:
                raise KeyError(str(run_id)[:80])
            if row["state"] not in ("queued", "running"):
                return row["state"]
            stopping = self._stop_rows(db, [row], "cancelled before it started")
            if row["grp"]:
                stopping += self._stop_rows(db, self._partners(db, row), f"cancelled with {row['name']}, the other "
                                                                         "run of its group")
        self._signal(stopping)
        return "cancelled" if row["state"] == "queued" else "running"

    def _partners(self, db, row: dict) -> list[dict]:
        """The other runs of ``row``'s group that are queued or running."""
        return [self._row(r) for r in db.execute("SELECT * FROM runs WHERE grp=? AND id!=? AND state IN "
                                                 "('queued', 'running')", (row["grp"], row["id"]))]

    def _stop_rows(self, db, rows: list[dict], queued_message: str) -> list[dict]:
        """In a transaction: each queued row cancelled, each running row marked to stop; returns the running
        rows, whose process groups get SIGTERM once the transaction is committed (``_signal``)."""
        running = []
        for row in rows:
            if row["state"] == "queued":
                self._set(db, row["id"], state="cancelled", finished=time.time(), message=queued_message)
            elif row["state"] == "running":
                if row["cancel_requested"] is None:
                    self._set(db, row["id"], cancel_requested=time.time(), message="stopping...")
                running.append(row)
        return running

    def _signal(self, running: list[dict]) -> None:
        for row in running:
            if row["pid"] and is_alive(row["pid"], row["pid_start"]):
                signal_group(row["pid"], signal.SIGTERM)
        self._wake.set()

    # ---- recovery -----------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """On app start: running runs whose process is gone (or is not theirs) are finalised: with the
        final state their status.json reports, else ``interrupted``. Returns the ids changed."""
        changed = []
        for row in self.list(states=["running"]):
            if row["pid"] and is_alive(row["pid"], row["pid_start"]):
                continue
            if owner_alive(row["owner"]):
                continue  # its starter is alive and will reap it
            with self._row_guard(row):
                if self._finalise(row, exit_code=None, reaped=False):
                    changed.append(row["id"])
        return changed

    @contextmanager
    def _row_guard(self, row: dict) -> Iterator[None]:
        """One run whose handling fails (e.g. a status.json with a step too large for SQLite) is marked failed
        and the scheduler or the recovery goes on with the others, instead of failing every round or stopping
        the app from starting."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- logged with its traceback; the run gets a one-line message
            log.exception("run %s could not be handled; marking it failed", row["id"])
            if row.get("pid") and is_alive(row["pid"], row.get("pid_start")):  # a failed run has no live process
                signal_group(row["pid"], signal.SIGKILL)
            with self._transaction() as db:
                self._set(db, row["id"], state="failed", finished=time.time(), cancel_requested=None,
                          message=f"the app could not record this run's progress ({type(e).__name__}); "
                                  "it is marked failed")

    # ---- the scheduler ------------------------------------------------------------------------------
    def start(self) -> JobRegistry:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="deftx-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the scheduler thread. Processes keep running; another registry (a restarted app) will
        watch them, and finalise them once they end."""
        LIVE_OWNERS.discard(self.identity)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 -- the scheduler must survive a bad tick (e.g. a locked DB)
                log.exception("scheduler tick failed")
            self._wake.wait(self.poll)
            self._wake.clear()

    def tick(self) -> None:
        """One scheduler round (also called directly by tests)."""
        with self._lock:
            self._reap_own()
            self._watch_running()
            while not self._draining and self._start_next():
                pass

    def _reap_own(self) -> None:
        for run_id, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            row = self.get(run_id)
            if row is not None and row["state"] == "running":
                with self._row_guard(row):
                    self._finalise(row, exit_code=code, reaped=True)
            self._procs.pop(run_id, None)

    def _watch_running(self) -> None:
        now = time.time()
        for row in self.list(states=["running"]):
            alive = is_alive(row["pid"], row["pid_start"])
            if row["id"] not in self._procs and not alive:
                if not owner_alive(row["owner"]):
                    # its starter is gone (app restarted or crashed) and so is the process: nobody else
                    # will reap it
                    with self._row_guard(row):
                        self._finalise(row, exit_code=None, reaped=False)
                continue  # else its starter reaps it (or is starting it right now)
            with self._row_guard(row):
                self._mirror(row)
            if alive and row["cancel_requested"] and now - row["cancel_requested"] > self.grace:
                log.warning("run %s did not stop within %.0fs of SIGTERM: SIGKILL", row["id"], self.grace)
                signal_group(row["pid"], signal.SIGKILL)

    @staticmethod
    def _status(row: dict) -> dict:
        """The run folder's status.json, unless it is older than this start of the run: a resumed run's
        folder still holds the previous attempt's final state until the new process writes its own."""
        st = RunDir(row["run_dir"]).status()
        updated = st.get("updated")
        if row.get("started") and isinstance(updated, (int, float)) and updated < row["started"]:
            return {}
        return st

    def _mirror(self, row: dict) -> None:
        st = self._status(row)
        if not st:
            return
        changes = {k: st[k] for k in ("phase", "step", "total_steps") if k in st and st[k] != row[k]}
        if st.get("message") and not row["cancel_requested"] and st["message"] != row["message"]:
            changes["message"] = st["message"]
        if changes:
            with self._transaction() as db:
                cols = ", ".join(f"{k}=?" for k in changes)
                db.execute(f"UPDATE runs SET {cols} WHERE id=? AND state='running'", [*changes.values(), row["id"]])

    def _finalise(self, row: dict, *, exit_code: int | None, reaped: bool) -> bool:
        """Decide the final state of a run whose process has ended (or is gone)."""
        st = self._status(row)
        state = st.get("state")
        message = st.get("message", "")
        if state in FINAL_STATES:
            pass
        elif row["cancel_requested"]:
            state, message = "cancelled", "stopped (killed after the grace period)" if exit_code == -9 else "stopped"
        elif reaped and exit_code is not None and exit_code < 0:
            # killed from outside (OOM killer, kill -9, shutdown): like a crash, it can be resumed
            state = "interrupted"
            message = (f"the training process was killed ({signal_name(-exit_code)}); resume it to continue "
                       "from its last checkpoint")
        elif reaped:
            state, message = "failed", failure_message(Path(row["run_dir"]), exit_code)
        else:
            state, message = "interrupted", ("the training process is gone (app restarted or process killed); "
                                             "resume it to continue from its last checkpoint")
        changes = dict(state=state, finished=time.time(), message=message, exit_code=exit_code)
        for k in ("phase", "step", "total_steps"):
            if k in st:
                changes[k] = st[k]
        with self._transaction() as db:
            cur = db.execute("SELECT state FROM runs WHERE id=?", (row["id"],)).fetchone()
            if cur is None or cur["state"] != "running":
                return False
            self._set(db, row["id"], **changes)
            # a run of a group that ends without its vector ends the group: its other runs would only cost time
            stopping = self._stop_rows(db, self._partners(db, row), f"cancelled: {row['name']}, the other run of "
                                                                    f"its group, is {state}") \
                if row.get("grp") and state != "done" else []
        self._signal(stopping)
        log.info("run %s: %s", row["id"], state)
        return True

    def _start_next(self) -> bool:
        """Claim the oldest queued run if a slot is free and start its process; False if none started."""
        with self._transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM runs WHERE state='running'").fetchone()[0]
            if running >= self.max_concurrent:
                return False
            row = self._row(db.execute(f"SELECT * FROM runs WHERE state='queued' ORDER BY {QUEUE_ORDER} LIMIT 1")
                            .fetchone())
            if row is None:
                return False
            self._set(db, row["id"], state="running", started=time.time(), owner=self.identity, message="starting")
        run_dir = Path(row["run_dir"])
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / PROCESS_LOG, "ab") as out:
                proc = subprocess.Popen(process_argv(row), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=os.getcwd(),
                                        env=child_env())
        except (OSError, TypeError, ValueError) as e:  # also a registry row whose command is unusable
            with self._transaction() as db:
                self._set(db, row["id"], state="failed", finished=time.time(),
                          message=f"could not start the process: {getattr(e, 'strerror', None) or e}")
            return True
        self._procs[row["id"]] = proc
        with self._transaction() as db:
            self._set(db, row["id"], pid=proc.pid, pid_start=process_start(proc.pid), message="")
            cancelled = db.execute("SELECT cancel_requested FROM runs WHERE id=?", (row["id"],)).fetchone()[0]
        if cancelled:  # cancel arrived between the claim and the Popen
            signal_group(proc.pid, signal.SIGTERM)
        log.info("run %s started: pid %s", row["id"], proc.pid)
        return True

    # ---- housekeeping -------------------------------------------------------------------------------
    def wait(self, run_id: str, timeout: float = 60.0, states: Sequence[str] = FINAL_STATES) -> dict:
        """Block until ``run_id`` reaches one of ``states`` (ticking if no scheduler thread runs)."""
        end = time.time() + timeout
        while True:
            if self._thread is None:
                self.tick()
            row = self.get(run_id)
            if row and row["state"] in states:
                return row
            if time.time() > end:
                raise TimeoutError(f"run {run_id} still {row and row['state']} after {timeout}s")
            time.sleep(min(self.poll, 0.2))

    def shutdown(self, cancel_running: bool = False) -> None:
        """Stop the scheduler; optionally cancel the runs this process started (tests, benchmarks). Queued
        runs stay queued (the next app starts them); none is started while shutting down."""
        self._draining = True
        if cancel_running:
            for run_id in list(self._procs):
                self.cancel(run_id)
            end = time.time() + self.grace + 5
            while self._procs and time.time() < end:
                self.tick()
                time.sleep(0.1)
        self.stop()
