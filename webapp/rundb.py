"""The SQLite table of runs: ``<DEFTX_HOME>/registry.sqlite3`` (WAL mode, one short-lived connection per call)
records every run: queued, running, finished or pulled from the Hub. Several app processes may share the file;
every state change that must not race is one ``BEGIN IMMEDIATE`` transaction guarded by the current state.
Starting, watching and stopping the runs' processes is ``webapp.jobs.JobRegistry``'s part.
"""
from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deftx_engine.constants import KINDS
from deftx_engine.errors import DeftxError
from deftx_engine.fileio import write_json_atomic
from deftx_engine.training.config import TrainConfig
from deftx_engine.training.runs import RunDir

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
    queued REAL,
    grp TEXT,
    resume INTEGER
);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state, created);
"""
MAX_ID_CHARS = 64  # ids are made by new_id (22 characters) or given by a caller
COLUMNS = ("id", "name", "kind", "state", "created", "started", "finished", "pid", "run_dir", "config", "message",
           "phase", "step", "total_steps", "command", "vector_dir", "pid_start", "owner", "cancel_requested",
           "exit_code", "queued", "grp", "resume")
# columns added after the first release: (name, type) added to an older registry file on open
MIGRATIONS = (("queued", "REAL"), ("grp", "TEXT"), ("resume", "INTEGER"))
# queue order: when a run was (re)queued; a resumed run waits behind the runs queued before it
QUEUE_ORDER = "COALESCE(queued, created), rowid"
RESUMABLE = ("interrupted", "cancelled", "failed")


class QueueFull(Exception):
    """``submit`` / ``resume`` refused: ``max_queued`` runs are waiting already."""


class GroupBusy(Exception):
    """``submit_group`` refused: a group of that name is under way (its runs' ids in ``ids``)."""

    def __init__(self, ids: list[str]):
        super().__init__(f"runs {', '.join(ids)} are under way")
        self.ids = ids


@dataclass(frozen=True)
class Submission:
    """One run to queue under ``name``: a training run of ``config`` (the row holds it, the run folder's
    ``config.json`` repeats it, and its process is made when it starts: ``process_argv``), or -- given a
    ``command`` -- a process of another sort, run as given (tests queue stand-ins)."""
    name: str
    kind: str
    command: Sequence[str] = ()
    config: TrainConfig | None = None


def process_argv(row: dict) -> list[str]:
    """The argv of a run's process, made when it starts (and so also when it resumes): ``deftx train-<kind>`` on
    the config in its run folder, with ``--resume`` once the run was resumed. A row that holds its own argv (a
    stand-in, or a row of a version that stored the argv) runs that, ``--resume`` added the same way."""
    run_dir = RunDir(row["run_dir"])
    argv = list(row["command"] or [sys.executable, "-m", "deftx_engine.cli", f"train-{row['kind']}", "--config",
                                   str(run_dir.submitted_file), "--output-dir", str(run_dir.path)])
    if row.get("resume") and "--resume" not in argv:
        argv.append("--resume")
    return argv


class RunDB:
    """The runs of one DEFTX_HOME, as dicts (``config`` and ``command`` decoded from JSON)."""

    def __init__(self, home: str | Path, db_name: str = "registry.sqlite3"):
        self.home = Path(home)
        self.runs_root = self.home / "runs"
        self.vectors_root = self.home / "vectors"
        for d in (self.home, self.runs_root, self.vectors_root):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / db_name
        self._wake = threading.Event()  # set when a run is queued, so a scheduler starts it at once
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
        try:  # a row written by hand or by a broken version must not make every listing fail
            d["config"] = json.loads(d["config"] or "{}")
            d["command"] = json.loads(d["command"]) if d["command"] else None
        except (TypeError, ValueError):
            d["config"], d["command"] = {}, None
        if not isinstance(d["config"], dict):
            d["config"] = {}
        return d

    def get(self, run_id: str) -> dict | None:
        with self._connect() as db:
            return self._select(db, run_id)

    def _select(self, db: sqlite3.Connection, run_id) -> dict | None:
        """The row of ``run_id``, or None for an unknown id -- also for anything that is not an id at all (a
        JSON object or list from the API, a 100,000-character string): one home for what an id may be."""
        if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_ID_CHARS:
            return None
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

    def submit(self, name: str, kind: str, command: Sequence[str] = (), *, config: TrainConfig | None = None,
               run_id: str | None = None, max_queued: int | None = None, distinct: bool = False) -> str:
        """Queue a run (``Submission``): a training run of ``config``, or the process ``command``. Its run folder
        is ``<home>/runs/<id>`` (``run_dir``), where the process writes ``status.json``. The config is the row's
        and is written to the run folder as ``config.json`` (``RunDir.submitted_file``), which the training
        command reads (``--config``): the registry and the run hold one configuration.
        With ``max_queued``, ``QueueFull`` is raised if that many runs are waiting already (checked in the
        same transaction as the insert, so concurrent sessions cannot overshoot it). With ``distinct``, a name
        another run has gets ``-2``, ``-3``… (in the same transaction, so two sessions never share one)."""
        return self.submit_group(None, [Submission(name, kind, command, config)], max_queued=max_queued,
                                 distinct=distinct, run_ids=[run_id] if run_id else None)[0]

    def submit_group(self, group: str | None, runs: Sequence[Submission], *, max_queued: int | None = None,
                     distinct: bool = False, run_ids: Sequence[str] | None = None) -> list[str]:
        """Queue ``runs`` together, in one transaction, as one instance of ``group`` (e.g. the guided demo's two
        runs): ``GroupBusy`` if an instance of ``group`` is under way (a run of it running or queued and not
        being stopped), checked in the same transaction as the inserts, so two sessions pressing at the same
        moment queue one. The runs of an instance stand or fall together (``JobRegistry.cancel``). Returns the
        run ids in the order of ``runs``; ``QueueFull`` if ``max_queued`` would be passed."""
        stamp = self.new_id()
        ids = list(run_ids or [])
        ids += [self.new_id() for _ in range(len(runs) - len(ids))]
        with self._transaction() as db:
            if group:
                busy = self._group_rows(db, group, under_way=True)
                if busy:
                    raise GroupBusy([r["id"] for r in busy])
            self._check_queue(db, max_queued, len(runs))
            taken = {r[0] for r in db.execute("SELECT name FROM runs")} if distinct else set()
            now = time.time()
            for run_id, sub in zip(ids, runs, strict=True):
                if sub.config is None and not sub.command:
                    raise ValueError(f"{sub.name}: a run needs a config or a command")
                run_dir = self.run_dir(run_id)
                config = sub.config.to_dict() if sub.config else {}
                name, n = sub.name, 1
                while name in taken:
                    n += 1
                    name = f"{sub.name}-{n}"
                taken.add(name)
                write_json_atomic(RunDir(run_dir).submitted_file, config)
                db.execute("INSERT INTO runs (id, name, kind, state, created, queued, run_dir, config, command, "
                           "vector_dir, grp) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                           (run_id, name, sub.kind, now, now, str(run_dir), json.dumps(config),
                            json.dumps(list(sub.command)) if sub.command else None,
                            str(RunDir(run_dir).vector_dir), f"{group}:{stamp}" if group else None))
        self._wake.set()
        return ids

    def run_dir(self, run_id: str) -> Path:
        """The run folder of ``run_id`` (a stand-in process is told it before it is queued)."""
        return self.runs_root / run_id

    def group(self, group: str) -> list[dict]:
        """The runs of the instance of ``group`` under way, else of its newest instance (in the order they were
        queued); [] if there is none."""
        with self._connect() as db:
            return self._group_rows(db, group, under_way=True) or self._group_rows(db, group, under_way=False)

    def _group_rows(self, db: sqlite3.Connection, group: str, *, under_way: bool) -> list[dict]:
        where = "substr(grp, 1, ?) = ?"
        if under_way:
            where += " AND state IN ('running', 'queued') AND cancel_requested IS NULL"
        found = db.execute(f"SELECT grp FROM runs WHERE {where} ORDER BY created DESC, rowid DESC LIMIT 1",
                           (len(group) + 1, group + ":")).fetchone()
        if found is None:
            return []
        return [self._row(r) for r in db.execute("SELECT * FROM runs WHERE grp=? ORDER BY rowid", (found[0],))]

    @staticmethod
    def _check_queue(db: sqlite3.Connection, max_queued: int | None, adding: int = 1) -> None:
        if max_queued is not None:
            waiting = db.execute("SELECT COUNT(*) FROM runs WHERE state='queued'").fetchone()[0]
            if waiting + adding > max_queued:
                raise QueueFull(f"{waiting} runs are waiting already (the limit is {max_queued})")

    def resume(self, run_id: str, *, max_queued: int | None = None) -> dict:
        """Queue an ``interrupted``, ``cancelled`` or ``failed`` training run again, as the same run (same id,
        same run folder), to start with ``--resume`` (``process_argv``): the CLI continues from the newest complete
        checkpoint (or skips phase 1 if the mask exists). It waits behind the runs queued before it.
        Returns the updated row; ``ValueError`` if the run cannot be resumed, ``KeyError`` if unknown."""
        with self._transaction() as db:
            row = self._select(db, run_id)
            if row is None:
                raise KeyError(str(run_id)[:80])
            if row["state"] not in RESUMABLE:
                raise ValueError(f"run {row['name']} is {row['state']}; only "
                                 f"{', '.join(RESUMABLE)} runs can be resumed")
            if row["kind"] not in KINDS or row["run_dir"] == row["vector_dir"]:  # add_vector's rows
                raise ValueError(f"{row['name']} was not trained here (pulled vector), so there is nothing to resume")
            folder = RunDir(row["run_dir"])
            try:  # a folder deleted (or emptied) behind the registry's back: said now, not by the process later
                folder.require_run(f"run {row['name']}: its folder", queued=True)
            except DeftxError as e:
                raise ValueError(f"{e.message} There is nothing to resume: start the run anew.") from None
            writer = folder.writer()  # the folder's lock, whatever this row says of the process
            if writer:
                raise ValueError(f"run {row['name']} still has a live training process ({writer}); cancel it "
                                 "first, then resume")
            self._check_queue(db, max_queued)
            db.execute("UPDATE runs SET state='queued', queued=?, started=NULL, finished=NULL, pid=NULL, "
                       "pid_start=NULL, owner=NULL, cancel_requested=NULL, exit_code=NULL, resume=1, message=? "
                       "WHERE id=?", (time.time(), "queued to resume from its last checkpoint", run_id))
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

    def add_metrics(self, run_id: str, key: str, value: dict) -> dict | None:
        """Add one evaluation's metrics under ``key`` to a run's config (for its model card), read and written in
        one transaction: concurrent evaluations of one vector all keep their metrics. None if the run is gone."""
        with self._transaction() as db:
            row = self._select(db, run_id)
            if row is None:  # deleted meanwhile (by another session): the scores are shown all the same
                return None
            metrics = row["config"].get("metrics")
            config = {**row["config"], "metrics": {**(metrics if isinstance(metrics, dict) else {}), key: value}}
            self._set(db, run_id, config=config)
        return config

    def delete(self, run_id: str) -> dict:
        """Remove a finished run: its row and its folder (a run's under ``runs/``, a pulled vector's under
        ``vectors/``; nothing outside them). A running or queued run is refused (``ValueError``: cancel it first),
        in the same transaction as the removal, so the scheduler cannot start it meanwhile. Returns the row;
        ``KeyError`` if unknown."""
        with self._transaction() as db:
            row = self._select(db, run_id)
            if row is None:
                raise KeyError(str(run_id)[:80])
            if row["state"] in ("running", "queued"):
                raise ValueError(f"run {row['name']} is {row['state']}: cancel it first")
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))
        folder = Path(row["run_dir"]).resolve()
        if folder.parent in (self.runs_root.resolve(), self.vectors_root.resolve()) and folder.name == run_id:
            shutil.rmtree(folder, ignore_errors=True)
        return row
