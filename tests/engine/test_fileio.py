"""Atomic writes: readers see the old content or the new one; a failed write leaves the old one."""
import json
import os
from pathlib import Path

import pytest
import torch

from deftx_engine.errors import DeftxError
from deftx_engine.fileio import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_text, write_json_atomic
from tiny import ASSETS, make_vector, tiny_bert_config


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


# ---- the CLI's --output files ---------------------------------------------------------------------------
EVAL = ASSETS / "target_eval_id.csv"


@pytest.fixture
def tiny_cli(monkeypatch):
    """``deftx`` with a real tiny classifier and tokenizer in place of the composed model (vectors not loaded)."""
    from transformers import BertForSequenceClassification, BertTokenizer

    from deftx_engine import cli

    names = ["negative", "neutral", "positive"]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "makanan", "ini", "enak"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(
        vocab_size=len(words), num_labels=3, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})).eval()
    monkeypatch.setattr(cli, "_composed", lambda args: (model, tok))
    return cli.main


@pytest.fixture
def renames(monkeypatch):
    """Every rename fileio makes, as (source, destination) paths."""
    from deftx_engine import fileio

    seen, real = [], os.replace

    def spy(src, dst, *a, **kw):
        seen.append((Path(src), Path(dst)))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(fileio.os, "replace", spy)
    return seen


def renamed_into_place(seen, out: Path) -> bool:
    """Whether ``out`` was written as a hidden sibling and renamed onto its name (fileio's rule)."""
    return any(dst == out and src.parent == out.parent and src.name.startswith(f".{out.name}.") for src, dst in seen)


@pytest.fixture
def vector_dir(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return make_vector(BertForSequenceClassification(tiny_bert_config(num_labels=3))).save(tmp_path / "vec")


def test_cli_output_files_are_written_aside_and_renamed(tiny_cli, renames, vector_dir, tmp_path, capsys):
    outs = {name: tmp_path / name for name in ("eval.json", "pred.csv", "report.json")}
    for out in outs.values():
        out.write_text("old")
    vec = str(vector_dir)
    assert tiny_cli(["evaluate", "--task", vec, "--data", str(EVAL), "--output", str(outs["eval.json"])]) == 0
    assert json.loads(outs["eval.json"].read_text())["n"] == 90
    assert tiny_cli(["predict", "--task", vec, "--data", str(EVAL), "--output", str(outs["pred.csv"])]) == 0
    rows = outs["pred.csv"].read_text().splitlines()
    assert rows[0].startswith("text,label,prediction,p_negative") and len(rows) == 91
    assert tiny_cli(["inspect", vec, "--output", str(outs["report.json"])]) == 0
    assert vec in json.loads(outs["report.json"].read_text())["vectors"]
    capsys.readouterr()
    for out in outs.values():
        assert renamed_into_place(renames, out), (out, renames)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*outs, "vec"])  # no temporary left


def test_an_interrupted_cli_prediction_file_keeps_the_old_one(tiny_cli, monkeypatch, vector_dir, tmp_path, capsys):
    from deftx_engine import inference

    real = inference.write_predictions

    def disk_full(out, *a, **kw):
        real(out, *a, **kw)  # the whole CSV went into the file object, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inference, "write_predictions", disk_full)
    out = tmp_path / "pred.csv"
    out.write_text("old predictions\n")
    assert tiny_cli(["predict", "--task", str(vector_dir), "--data", str(EVAL), "--output", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_text() == "old predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv", "vec"]
