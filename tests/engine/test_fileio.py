"""Atomic writes: readers see the old content or the new one; a failed write leaves the old one."""
import json

import pytest

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
    with atomic_dir(dest) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(dest) as d:
        (d / "b").write_text("2")
        raise RuntimeError
    assert [p.name for p in dest.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["vec"]
    with atomic_dir(dest) as d:
        (d / "c").write_text("3")
    assert [p.name for p in dest.iterdir()] == ["c"] and [p.name for p in tmp_path.iterdir()] == ["vec"]
