"""Optional per-step wall-clock times. Engine functions that take ``times`` add the seconds of each of their
steps to it, so a benchmark can show where the time goes in the engine's own code (``benchmarks/core.py``);
with ``times=None`` (every normal call) nothing is measured.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

Times = dict[str, float]


@contextmanager
def step(times: Times | None, name: str) -> Iterator[None]:
    """Add the wall time of the block to ``times[name]`` (no-op when ``times`` is None)."""
    if times is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
