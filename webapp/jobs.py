"""Job registry and scheduler: training runs are OS processes recorded in SQLite.

One table, ``runs``, in ``<DEFTX_HOME>/registry.sqlite3`` (WAL mode, one short-lived connection per call)
records every run: queued, running, finished or pulled from the Hub. Several app processes may share the
file; every state change that must not race (claiming a queued run, finishing a run) is one
``BEGIN IMMEDIATE`` transaction guarded by the current state.

The scheduler thread (``JobRegistry.start``) of each app process, every ``poll`` seconds:

1. reaps the processes it started (``Popen.poll``) and finalises their runs from the run folder's
   ``status.json`` (the only channel from the job; ``deftx_engine.runs.RunDir``) and the exit code;
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

import json
import logging
import os
import secrets
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from deftx_engine.runs import FINAL_STATES, RunDir

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,
    run_dir TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}',
    message TEXT NOT NULL DEFAULT '',
    phase TEXT NOT NULL DEFAULT '',
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    command TEXT,
    vector_dir TEXT,
    pid_start TEXT,
    owner TEXT,
    cancel_requested REAL,
    exit_code INTEGER,
    queued REAL
);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state, created);
"""
COLUMNS = ("id", "name", "kind", "state", "created", "started", "finished", "pid", "run_dir", "config", "message",
           "phase", "step", "total_steps", "command", "vector_dir", "pid_start", "owner", "cancel_requested",
           "exit_code", "queued")
# columns added after the first release: (name, type) added to an older registry file on open
MIGRATIONS = (("queued", "REAL"),)
# queue order: when a run was (re)queued; a resumed run waits behind the runs queued before it
QUEUE_ORDER = "COALESCE(queued, created), rowid"
RESUMABLE = ("interrupted", "cancelled", "failed")


class QueueFull(Exception):
    """``submit`` / ``resume`` refused: ``max_queued`` runs are waiting already."""
PROCESS_LOG = "process.log"


# ---- process identity -------------------------------------------------------------------------------
_LINUX = Path("/proc/self/stat").exists()
_LIVE: set[str] = set()  # owner ids of the registries of this process whose scheduler may still reap


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from /proc, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def process_start(pid: int | None) -> str | None:
    """Start time of ``pid`` (zombies included), or None if there is no such process. Off Linux the pid
    itself stands in for it (only "is there a process" can be told)."""
    if not pid or pid <= 0:
        return None
    if _LINUX:
        st = _proc_stat(pid)
        return st[1] if st else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return str(pid)


def is_alive(pid: int | None, start: str | None) -> bool:
    """True if ``pid`` runs (not a zombie) and is the process whose start time was recorded."""
    if not pid or pid <= 0:
        return False
    if _LINUX:
        st = _proc_stat(pid)
        return st is not None and st[0] not in ("Z", "X") and (start is None or st[1] == start)
    return process_start(pid) is not None


def _owner_alive(owner: str | None) -> bool:
    """Is the app process (and, inside this process, the registry) that started a run still there?"""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) != 3 or not parts[0].isdigit():
        return False
    if int(parts[0]) == os.getpid():
        return owner in _LIVE
    return is_alive(int(parts[0]), None if parts[1] == "None" else parts[1])


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def failure_message(run_dir: Path, exit_code: int | None) -> str:
    """A one-line reason for a process that ended without a final state: the CLI's user-facing error
    (``deftx: error: ...``) if there is one, else the last exception line of its log, never a traceback."""
    try:
        lines = (run_dir / PROCESS_LOG).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    lines = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("deftx: error:"):
            return ln[len("deftx: error:"):].strip()
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln[:500]
    code = "killed by a signal" if exit_code is not None and exit_code < 0 else f"exit code {exit_code}"
    return f"the process ended ({code}) without reporting a result; see {run_dir / PROCESS_LOG}"


# ---- the registry -----------------------------------------------------------------------------------
class JobRegistry:
    """Runs in SQLite plus a scheduler thread that starts, watches and stops their processes."""

    def __init__(self, home: str | Path, *, max_concurrent: int | None = None, poll: float = 0.5,
                 grace: float = 10.0, db_name: str = "registry.sqlite3"):
        self.home = Path(home)
        self.runs_root = self.home / "runs"
        self.vectors_root = self.home / "vectors"
        for d in (self.home, self.runs_root, self.vectors_root):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / db_name
        if max_concurrent is None:
            from . import env_number

            max_concurrent = env_number("DEFTX_MAX_JOBS", 1, minimum=1)
        self.max_concurrent = max(1, int(max_concurrent))
        self.poll = poll
        self.grace = grace
        self.identity = f"{os.getpid()}:{process_start(os.getpid())}:{secrets.token_hex(4)}"
        _LIVE.add(self.identity)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._draining = False  # set by shutdown(): no new process is started
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
            for col, typ in MIGRATIONS:
                if col not in have:
                    try:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {col} {typ}")
                    except sqlite3.OperationalError as e:  # another app process added it a moment ago
                        if "duplicate column" not in str(e):
                            raise

    # ---- SQLite ------------------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _row(r: sqlite3.Row | None) -> dict | None:
        if r is None:
            return None
        d = dict(r)
        d["config"] = json.loads(d["config"] or "{}")
        d["command"] = json.loads(d["command"]) if d["command"] else None
        return d

    def get(self, run_id: str) -> dict | None:
        with self._connect() as db:
            return self._row(db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())

    def list(self, states: Sequence[str] | None = None, kind: str | None = None) -> list[dict]:
        """Runs, newest first (optionally only some states / one kind)."""
        sql, args = "SELECT * FROM runs", []
        where = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if kind:
            where.append("kind=?")
            args.append(kind)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._connect() as db:
            return [self._row(r) for r in db.execute(sql + " ORDER BY created DESC, rowid DESC", args)]

    def queue_position(self, run_id: str) -> int | None:
        """1 for the next run to start, None if ``run_id`` is not queued."""
        with self._connect() as db:
            ids = [r[0] for r in db.execute(f"SELECT id FROM runs WHERE state='queued' ORDER BY {QUEUE_ORDER}")]
        return ids.index(run_id) + 1 if run_id in ids else None

    def _set(self, db: sqlite3.Connection, run_id: str, **changes) -> None:
        if "config" in changes:
            changes["config"] = json.dumps(changes["config"])
        cols = ", ".join(f"{k}=?" for k in changes)
        db.execute(f"UPDATE runs SET {cols} WHERE id=?", [*changes.values(), run_id])

    # ---- creating runs ------------------------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)

    def submit(self, name: str, kind: str, command: Sequence[str], *, config: dict | None = None,
               run_id: str | None = None, max_queued: int | None = None) -> str:
        """Queue a run. ``command`` is the argv of its process; ``{run_dir}`` in it is replaced by the
        run folder (``<home>/runs/<id>``), which is where the process must write ``status.json``.
        With ``max_queued``, ``QueueFull`` is raised if that many runs are waiting already (checked in the
        same transaction as the insert, so concurrent sessions cannot overshoot it)."""
        run_id = run_id or self.new_id()
        run_dir = self.runs_root / run_id
        argv = [str(a).replace("{run_dir}", str(run_dir)) for a in command]
        with self._transaction() as db:
            self._check_queue(db, max_queued)
            now = time.time()
            db.execute("INSERT INTO runs (id, name, kind, state, created, queued, run_dir, config, command, "
                       "vector_dir) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                       (run_id, name, kind, now, now, str(run_dir), json.dumps(config or {}), json.dumps(argv),
                        str(RunDir(run_dir).vector_dir)))
        self._wake.set()
        return run_id

    @staticmethod
    def _check_queue(db: sqlite3.Connection, max_queued: int | None) -> None:
        if max_queued is not None:
            waiting = db.execute("SELECT COUNT(*) FROM runs WHERE state='queued'").fetchone()[0]
            if waiting >= max_queued:
                raise QueueFull(f"{waiting} runs are waiting already (the limit is {max_queued})")

    def resume(self, run_id: str, *, max_queued: int | None = None) -> dict:
        """Queue an ``interrupted``, ``cancelled`` or ``failed`` training run again, as the same run (same id,
        same run folder) with ``--resume`` added to its command: the CLI continues from the newest complete
        checkpoint (or skips phase 1 if the mask exists). It waits behind the runs queued before it.
        Returns the updated row; ``ValueError`` if the run cannot be resumed, ``KeyError`` if unknown."""
        with self._transaction() as db:
            row = self._row(db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())
            if row is None:
                raise KeyError(run_id)
            if row["state"] not in RESUMABLE:
                raise ValueError(f"run {row['name']} is {row['state']}; only "
                                 f"{', '.join(RESUMABLE)} runs can be resumed")
            if not row["command"] or row["kind"] not in ("language", "task"):
                raise ValueError(f"{row['name']} was not trained here (pulled vector), so there is nothing to resume")
            self._check_queue(db, max_queued)
            argv = list(row["command"])
            if "--resume" not in argv:
                argv.append("--resume")
            db.execute("UPDATE runs SET state='queued', queued=?, started=NULL, finished=NULL, pid=NULL, "
                       "pid_start=NULL, owner=NULL, cancel_requested=NULL, exit_code=NULL, command=?, message=? "
                       "WHERE id=?", (time.time(), json.dumps(argv), "queued to resume from its last checkpoint",
                                      run_id))
        self._wake.set()
        return self.get(run_id)

    def add_vector(self, name: str, kind: str, vector_dir: str | Path, *, config: dict | None = None,
                   run_id: str | None = None, message: str = "") -> str:
        """Record a vector that exists already (pulled from the Hub or a folder) as a finished run."""
        run_id = run_id or self.new_id()
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO runs (id, name, kind, state, created, started, finished, run_dir, config, "
                       "vector_dir, message, phase) VALUES (?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?, 'done')",
                       (run_id, name, kind, now, now, now, str(vector_dir), json.dumps(config or {}),
                        str(vector_dir), message))
        return run_id

    def update_config(self, run_id: str, **changes) -> dict:
        """Merge ``changes`` into a run's config (e.g. evaluation metrics for its model card)."""
        with self._transaction() as db:
            row = self._row(db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())
            if row is None:
                raise KeyError(run_id)
            config = {**row["config"], **changes}
            self._set(db, run_id, config=config)
        return config

    # ---- cancelling ---------------------------------------------------------------------------------
    def cancel(self, run_id: str) -> str:
        """Queued: cancelled at once. Running: SIGTERM to its process group now, SIGKILL after ``grace``
        seconds if it is still alive. Returns the state after the call."""
        with self._transaction() as db:
            row = self._row(db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())
            if row is None:
                raise KeyError(run_id)
            if row["state"] == "queued":
                self._set(db, run_id, state="cancelled", finished=time.time(), message="cancelled before it started")
                return "cancelled"
            if row["state"] != "running":
                return row["state"]
            if row["cancel_requested"] is None:
                self._set(db, run_id, cancel_requested=time.time(), message="stopping...")
        if row["pid"] and is_alive(row["pid"], row["pid_start"]):
            self._signal(row["pid"], signal.SIGTERM)
        self._wake.set()
        return "running"

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # the job is a session leader: its pgid is its pid
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    # ---- recovery -----------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """On app start: running runs whose process is gone (or is not theirs) are finalised: with the
        final state their status.json reports, else ``interrupted``. Returns the ids changed."""
        changed = []
        for row in self.list(states=["running"]):
            if row["pid"] and is_alive(row["pid"], row["pid_start"]):
                continue
            if _owner_alive(row["owner"]):
                continue  # its starter is alive and will reap it
            if self._finalise(row, exit_code=None, reaped=False):
                changed.append(row["id"])
        return changed

    # ---- the scheduler ------------------------------------------------------------------------------
    def start(self) -> "JobRegistry":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="deftx-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the scheduler thread. Processes keep running; another registry (a restarted app) will
        watch them, and finalise them once they end."""
        _LIVE.discard(self.identity)
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
                self._finalise(row, exit_code=code, reaped=True)
            self._procs.pop(run_id, None)

    def _watch_running(self) -> None:
        now = time.time()
        for row in self.list(states=["running"]):
            alive = is_alive(row["pid"], row["pid_start"])
            if row["id"] not in self._procs and not alive:
                if not _owner_alive(row["owner"]):
                    # its starter is gone (app restarted or crashed) and so is the process: nobody else
                    # will reap it
                    self._finalise(row, exit_code=None, reaped=False)
                continue  # else its starter reaps it (or is starting it right now)
            self._mirror(row)
            if alive and row["cancel_requested"] and now - row["cancel_requested"] > self.grace:
                log.warning("run %s did not stop within %.0fs of SIGTERM: SIGKILL", row["id"], self.grace)
                self._signal(row["pid"], signal.SIGKILL)

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
            message = (f"the training process was killed ({_signal_name(-exit_code)}); resume it to continue "
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
                proc = subprocess.Popen(row["command"], stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=os.getcwd(),
                                        env=self._child_env())
        except OSError as e:
            with self._transaction() as db:
                self._set(db, row["id"], state="failed", finished=time.time(),
                          message=f"could not start the process: {e.strerror or e}")
            return True
        self._procs[row["id"]] = proc
        with self._transaction() as db:
            self._set(db, row["id"], pid=proc.pid, pid_start=process_start(proc.pid), message="")
            cancelled = db.execute("SELECT cancel_requested FROM runs WHERE id=?", (row["id"],)).fetchone()[0]
        if cancelled:  # cancel arrived between the claim and the Popen
            self._signal(proc.pid, signal.SIGTERM)
        log.info("run %s started: pid %s", row["id"], proc.pid)
        return True

    @staticmethod
    def _child_env() -> dict:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):  # training never needs the user's write token
            env.pop(var, None)
        return env

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
