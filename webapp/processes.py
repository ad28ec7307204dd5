"""The processes of training jobs: identity (pid and start time, so a reused pid is never taken for a run's
process), signals to a job's process group, the environment a job gets, and the one-line reason of a failure."""
from __future__ import annotations

import os
import signal
from pathlib import Path

PROCESS_LOG = "process.log"

_LINUX = Path("/proc/self/stat").exists()
LIVE_OWNERS: set[str] = set()  # owner ids of the registries of this process whose scheduler may still reap


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


def owner_alive(owner: str | None) -> bool:
    """Is the app process (and, inside this process, the registry) that started a run still there?"""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) != 3 or not parts[0].isdigit():
        return False
    if int(parts[0]) == os.getpid():
        return owner in LIVE_OWNERS
    return is_alive(int(parts[0]), None if parts[1] == "None" else parts[1])


def signal_name(sig: int) -> str:
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


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the job's process group (a job is a session leader: its pgid is its pid), else to
    ``pid``; a process that is gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def child_env() -> dict:
    """The environment of a training job: the app's, without the user's Hub token (training never needs it)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(var, None)
    return env
