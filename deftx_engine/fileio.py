"""Atomic file and folder writes: readers (the web app polling a run folder, a second process loading a
vector) see the old content or the new one, never half a file, and an interrupted write leaves the old
content in place. Every file the engine, the benchmarks and the web app write whole goes through this module;
logs are appended, and the few writers that write aside and rename by hand are listed, with why, in
tests/engine/test_fileio.py, which fails on any other direct write.
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

from .errors import DeftxError


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


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file the command may write (``flag`` names its option), checked before any work: not a
    folder, in a folder that exists."""
    path = Path(path)
    if path.is_dir():
        raise DeftxError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise DeftxError(f"{flag} {path}: the folder {path.parent} does not exist")
    return path


def check_replaceable(dest: Path, marker: str) -> None:
    """Raise ``DeftxError`` unless ``dest`` is absent, an empty folder, or a folder holding ``marker`` (a file
    only DeFT-X writes there, e.g. a vector's ``sft_config.json``): an output folder is only ever replaced
    when it holds what the project wrote, never a folder of other files, a file or a symlink."""
    if not os.path.lexists(dest):
        return
    if dest.is_symlink() or not dest.is_dir():
        raise DeftxError(f"{dest} exists and is not a folder; choose another output folder")
    try:
        empty = next(dest.iterdir(), None) is None
    except OSError as e:
        raise DeftxError(f"{dest}: cannot be read ({e.strerror or e}); choose another output folder") from None
    if not empty and not ((dest / marker).is_file() and not (dest / marker).is_symlink()):
        raise DeftxError(f"{dest} holds files DeFT-X did not write (no {marker}); it is left untouched: choose "
                         "another output folder, or empty it")


def replace_dir(new: Path, dest: Path, marker: str) -> None:
    """Rename the folder ``new`` onto ``dest`` (same parent), replacing an existing ``dest`` only if
    ``check_replaceable`` allows it: the old folder is renamed aside first (to a fresh hidden name) and put
    back if the second rename fails, then removed."""
    check_replaceable(dest, marker)
    old = None
    if os.path.lexists(dest):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        dest.rename(old)  # onto the empty folder just made: atomic on POSIX
    try:
        new.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sibling_tempdir(dest: Path, tag: str = "") -> Path:
    """A new hidden folder beside ``dest`` (same file system, so it can be renamed into place)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{tag}", dir=dest.parent))
    except OSError as e:
        raise DeftxError(f"{dest}: the folder cannot be written ({e.strerror or e})") from None


@contextmanager
def atomic_dir(dest: str | Path, marker: str) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``dest`` to fill (it must hold ``marker``); it replaces ``dest``
    (see ``replace_dir``) when the block ends without an exception and is removed otherwise, so ``dest`` is
    either complete or untouched. A ``dest`` that may not be replaced is refused before anything is written."""
    dest = Path(dest)
    check_replaceable(dest, marker)
    tmp = sibling_tempdir(dest)
    try:
        yield tmp
        replace_dir(tmp, dest, marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
