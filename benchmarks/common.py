"""What every benchmark script needs on a shared machine: who else is using the CPU (``OtherCpu``), waiting
for a quiet machine (``wait_quiet``), the machine description that heads each result (``machine_info``),
writing a result as ``PREFIX.json`` + ``PREFIX.md`` (``write_outputs``) and replacing one section of
``benchmarks/RESULTS.md`` (``write_results_section``).
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import sys
import time
from pathlib import Path

from deftx_engine.fileio import atomic_write_text, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"


class OtherCpu:
    """Cores that *other* processes used during a block: /proc/stat busy time minus this process's (and its
    waited-for children's). 0 means the machine was ours; 1 means another process took a whole core.

    ``cores`` is None off Linux and for blocks shorter than ``min_wall`` seconds (jiffy counters say
    nothing about very short blocks).
    """

    def __init__(self, min_wall: float = 0.0):
        self.min_wall = min_wall
        self.cores: float | None = None

    @staticmethod
    def _counters() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # + waited-for children
        except (OSError, ValueError, IndexError):
            return None
        return sum(v[:8]) - v[3] - v[4], own  # user nice system [idle iowait] irq softirq steal

    def __enter__(self) -> OtherCpu:
        self.cores = None
        self._c0, self._t0 = self._counters(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        c1, wall = self._counters(), time.perf_counter() - self._t0
        if self._c0 and c1 and wall > 0 and wall >= self.min_wall:
            self.cores = max(0.0, ((c1[0] - self._c0[0]) - (c1[1] - self._c0[1])) / os.sysconf("SC_CLK_TCK") / wall)


def other_cores(window: float = 3.0) -> float | None:
    """Cores other processes used over the next ``window`` seconds (None off Linux)."""
    with OtherCpu() as o:
        time.sleep(window)
    return o.cores


def wait_quiet(limit: float, what: str, threshold: float = 0.15, window: float = 3.0) -> tuple[float, float | None]:
    """Wait (at most ``limit`` s; not at all when ``limit`` <= 0) until other processes use < ``threshold``
    cores over ``window`` s, so their jobs stay out of the next timing.

    Returns the seconds waited and the last reading (None when nothing was measured).
    """
    t0 = time.perf_counter()
    cores = None
    while limit > 0 and time.perf_counter() - t0 < limit:
        cores = other_cores(window)
        if cores is None or cores < threshold:
            break
    waited = time.perf_counter() - t0
    if waited > window + 0.5:
        print(f"  waited {waited:.0f} s for a quiet machine before {what}", file=sys.stderr, flush=True)
    return waited, cores


def machine_info(*packages: str) -> dict[str, str]:
    """Date, CPU model, cores available to this process, RAM, Python, the versions of ``packages`` and the
    load average at start: the header of every result."""
    cpu, ram = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            ram = f"{int(next(line.split()[1] for line in f if line.startswith('MemTotal'))) / 2 ** 20:.0f} GB"
    except (OSError, StopIteration, ValueError):
        pass
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
            "RAM": ram, "python": platform.python_version()}
    for name in packages:
        info[name] = importlib.import_module(name).__version__
        if name == "torch":
            info["torch threads"] = str(sys.modules["torch"].get_num_threads())
    info["load average (1/5/15 min) at start"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def prefixed(prefix: Path, suffix: str) -> Path:
    """``PREFIX`` + ``suffix``: an output prefix such as ``s09-k0.1`` keeps its dot (``with_suffix`` would cut it)."""
    return prefix.with_name(prefix.name + suffix)


def write_outputs(prefix: Path, result: dict, md: str) -> None:
    """``PREFIX.json`` (every number; values JSON cannot hold written as text) and ``PREFIX.md`` (the tables),
    each written aside and renamed, then the tables on stdout."""
    write_json_atomic(prefixed(prefix, ".json"), result, default=str)
    atomic_write_text(prefixed(prefix, ".md"), md)
    print(md)


def write_results_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace the ``heading`` section of RESULTS.md (up to the next ``## `` heading) with ``heading`` +
    ``body``, or append it; the other sections are kept byte for byte."""
    section = heading + "\n\n" + body.strip("\n") + "\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if heading + "\n" in text:
        start = text.index(heading + "\n")
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)
