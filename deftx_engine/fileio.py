"""Atomic file and folder writes: readers (the web app polling a run folder, a second process loading a
vector) see the old content or the new one, never half a file, and an interrupted write leaves the old
content in place. Every writer in the engine, the benchmarks and the web app goes through this module.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a hidden temporary sibling of ``path`` for writing; it replaces ``path`` when the block ends
    without an exception and is removed otherwise (streaming writers such as uploads use this directly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding, newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json_atomic(path: str | Path, data: Any, *, default: Any = None) -> None:
    """Replace ``path`` with ``data`` as indented JSON atomically (``default`` as in ``json.dump``)."""
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, default=default)


def replace_dir(new: Path, dest: Path) -> None:
    """Rename the folder ``new`` onto ``dest`` (same parent), replacing an existing ``dest``: the old folder
    is renamed aside first and put back if the second rename fails, then removed."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``dest`` to fill; it replaces ``dest`` when the block ends
    without an exception and is removed otherwise, so ``dest`` is either complete or untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
