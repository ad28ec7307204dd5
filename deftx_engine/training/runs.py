"""A training run's folder: the single channel between a training process and whoever watches it.

``status.json`` (state, phase, step, total steps, loss, ETA) is rewritten atomically as training goes;
``metrics.jsonl`` gets one line per logged step; ``run.json`` holds the resolved configuration. The CLI
writes them, the web app only reads them (and sends SIGTERM to cancel). The one file a front end writes is
``config.json``, the settings it submits (``deftx train-* --config``), before the process starts.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DeftxError
from ..fileio import write_json_atomic
from .config import same_run

LOCK_FILE = ".lock"  # held (flock) by the one process that writes the folder
STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
SUBMITTED_CONFIG = "config.json"
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
# what a run folder may hold before its run.json exists (the app writes process.log and config.json first)
RUN_ENTRIES = frozenset({".lock", "run.json", "status.json", "metrics.jsonl", "log.txt", "process.log", "config.json",
                         "vector", "mask.safetensors", "spectra.json", "phase1", "phase2"})


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return default


@dataclass
class Status:
    state: str = "queued"
    phase: str = ""  # "full" | "denoise" | "sparse" | "save"
    step: int = 0  # of the whole run (both phases)
    total_steps: int = 0
    phase_step: int = 0  # of the phase that runs (its steps restart at 1)
    phase_steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    message: str = ""
    precision: str = ""  # "fp32" | "bf16" | "fp16": what the matrix products run in (precision.py)
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


class RunDir:
    """One run's output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.status_file = self.path / "status.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.config_file = self.path / "run.json"
        self.submitted_file = self.path / SUBMITTED_CONFIG
        self.log_file = self.path / "log.txt"
        self.vector_dir = self.path / "vector"
        self.mask_file = self.path / "mask.safetensors"
        self.spectra_file = self.path / "spectra.json"
        self.lock_file = self.path / LOCK_FILE
        self._status: Status | None = None
        self._lock_fd: int | None = None

    # ---- claiming the folder -----------------------------------------------------------------------
    def claim(self, config: dict, *, resume: bool, overwrite: bool) -> bool:
        """Take the folder for ``config``; returns True if an earlier run with the same config is resumed.

        A folder holding a different run is refused unless ``overwrite``; nothing is deleted before the
        new configuration is known to be valid.
        """
        old = read_json(self.config_file)
        if old is not None and not overwrite:
            if not same_run(old, config):
                raise ConfigError(f"{self.path} holds a different run (see {self.config_file}); "
                                  "choose another --output-dir or pass --overwrite")
            if not resume:
                raise ConfigError(f"{self.path} already holds this run; pass --resume to continue it "
                                  "or --overwrite to start again")
            self.lock()
            return True
        if old is None:
            self._check_new_folder()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.path}: the run folder cannot be written ({e.strerror or e}); "
                              "choose another --output-dir") from None
        self.lock()
        if overwrite:
            import shutil

            for child in self.path.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        try:
            write_json_atomic(self.config_file, config)
        except OSError as e:  # e.g. under /proc or /sys, or read-only
            raise ConfigError(f"{self.path}: the run folder cannot be written ({e.strerror or e}); "
                              "choose another --output-dir") from None
        return False

    def require_run(self, what: str, *, queued: bool = False, hint: str = "") -> None:
        """Refuse, naming the folder, a path given as a run that holds none (no run.json; with ``queued`` also
        a front end's config.json counts: a run queued but never started): ``inspect --run /etc`` or ``--resume``
        of a deleted folder is said at once, not found out later."""
        if self.config_file.is_file() or (queued and self.submitted_file.is_file()):
            return
        why = ("does not exist (was it deleted?)" if not os.path.lexists(self.path)
               else "is not a DeFT-X run folder (it has no run.json)")
        raise DeftxError(f"{what} {self.path} {why}.", hint=hint)

    def lock(self) -> None:
        """Become the folder's one writer: an exclusive ``flock`` on ``.lock``, held until ``unlock`` or the
        end of this process (the kernel releases it however the process ends, ``kill -9`` included). A folder
        another live process (or another RunDir of this one) writes is refused, whatever a registry says."""
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"{self.path}: the run folder cannot be written ({e.strerror or e}); "
                              "choose another --output-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = self.writer() or "pid unknown"
            raise ConfigError(f"{self.path} is being written by another training process ({holder}); wait for it "
                              "to end or cancel it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Stop being the folder's writer (the run is over: done, failed or stopped)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases its flock
            self._lock_fd = None

    @contextmanager
    def writing(self):
        """The block during which this process writes the run: the lock taken by ``claim`` is released at its
        end, however it ends."""
        try:
            yield
        finally:
            self.unlock()

    def writer(self) -> str | None:
        """``"pid N"`` of the live process that holds this folder's lock, or None if no process writes it."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return os.pread(fd, 64, 0).decode(errors="replace").strip() or "pid unknown"
            except OSError:
                return "pid unknown"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _check_new_folder(self) -> None:
        """A folder without run.json becomes a run folder only if it is absent, empty, or holds nothing but
        what a run (or the app, before the run starts) writes: a folder of other files (or ``/``) is never
        written into, nor emptied by --overwrite."""
        if not os.path.lexists(self.path):
            return
        if self.path.is_symlink() or not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a folder; choose another --output-dir")
        try:
            others = sorted(p.name for p in self.path.iterdir() if p.name not in RUN_ENTRIES)
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot be read ({e.strerror or e}); choose another --output-dir") from None
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(f"{self.path} holds files that are not a DeFT-X run ({shown}); it is left untouched: "
                              "choose another --output-dir (a new or empty folder)")

    # ---- status and metrics ------------------------------------------------------------------------
    def status(self) -> dict:
        return read_json(self.status_file, {}) or {}

    def update(self, **changes) -> None:
        """Rewrite status.json with ``changes``. A run folder deleted (or emptied) while the run goes is an
        error, never silently made again: the run must not end "done" without its run.json, log and mask."""
        if not self.config_file.is_file():
            raise DeftxError(f"{self.path}: the run folder (its run.json) was deleted while the run was going; "
                             "the run is stopped")
        if self._status is None:
            self._status = Status(**{k: v for k, v in self.status().items() if k in Status.__dataclass_fields__})
            self._status.pid = os.getpid()
        for k, v in changes.items():
            setattr(self._status, k, v)
        self._status.updated = time.time()
        write_json_atomic(self.status_file, asdict(self._status))

    @contextmanager
    def record_failure(self, active: bool = True):
        """Mark the run failed (or cancelled, on Ctrl-C) if the block raises, then re-raise."""
        try:
            yield
        except BaseException as e:
            if active:
                state = "cancelled" if isinstance(e, KeyboardInterrupt) else "failed"
                try:
                    self.update(state=state, message=f"{type(e).__name__}: {e}")
                except (OSError, DeftxError):  # e.g. the disk is full: the exception itself is what matters
                    pass
            raise

    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
        return out

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag that the trainer checks after each step."""

    def __init__(self):
        self.signal: int | None = None

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None
