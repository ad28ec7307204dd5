"""Atomic writes: readers see the old content or the new one; a failed write leaves the old one."""
import json

import pytest

from deftx_engine.errors import DeftxError
from deftx_engine.fileio import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_text, write_json_atomic


def test_writes_replace_whole_files(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_json_atomic(tmp_path / "s.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f.txt", "s.json", "sub"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_dir_replaces_a_folder_or_leaves_it(tmp_path):
    dest = tmp_path / "vec"
    with atomic_dir(dest, "a") as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(dest, "a") as d:
        (d / "b").write_text("2")
        raise RuntimeError
    assert [p.name for p in dest.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["vec"]
    with atomic_dir(dest, "a") as d:
        (d / "a").write_text("3")
    assert [p.read_text() for p in dest.iterdir()] == ["3"] and [p.name for p in tmp_path.iterdir()] == ["vec"]


@pytest.mark.parametrize("existing", ["other files", "a file", "a symlink"])
def test_atomic_dir_replaces_only_folders_the_project_wrote(tmp_path, existing):
    """Issue 11 #6: a folder of other files, a regular file or a symlink is refused with a message and left
    as it was (no `.old-<pid>` leftover); an empty folder or one holding the marker is replaced."""
    dest, keep = tmp_path / "out", tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    if existing == "other files":
        dest.mkdir()
        (dest / "mine.txt").write_text("x")
    elif existing == "a file":
        dest.write_text("x")
    else:
        dest.symlink_to(keep)
    with pytest.raises(DeftxError, match="out"), atomic_dir(dest, "sft_config.json") as d:
        (d / "sft_config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "out"] and (keep / "mine.txt").exists()
    assert dest.is_symlink() or (dest.read_text() if dest.is_file() else (dest / "mine.txt").read_text()) == "x"
