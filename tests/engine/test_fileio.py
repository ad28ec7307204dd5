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
    from deftx_engine.outputs import inference

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


# ---- who writes files -------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
INSIDE_A_TEMPORARY_FOLDER = "into a hidden temporary folder that is renamed into place whole"
LOG = "a log appended line by line while its process runs (never replaced)"
WRITERS_OUTSIDE_FILEIO = {  # (file, function): why its own file writes are safe without fileio's writers
    ("deftx_engine/cli.py", "_compose"): INSIDE_A_TEMPORARY_FOLDER + " (fileio.atomic_dir)",
    ("deftx_engine/method/vectors.py", "SparseVector.save"): INSIDE_A_TEMPORARY_FOLDER + " (fileio.atomic_dir)",
    ("benchmarks/crosslingual.py", "run_full_ft"): INSIDE_A_TEMPORARY_FOLDER + " (fileio.atomic_dir)",
    ("benchmarks/perf.py", "model_source"): INSIDE_A_TEMPORARY_FOLDER + " (fileio.atomic_dir)",
    ("deftx_engine/models/e5_small.py", "_build"): INSIDE_A_TEMPORARY_FOLDER + " (model_dir's mkdtemp, by hand)",
    ("deftx_engine/models/e5_small.py", "model_dir"): INSIDE_A_TEMPORARY_FOLDER + " (its mkdtemp, by hand)",
    ("deftx_engine/hub/transfer.py", "_strip_local_paths"): "into push_vector's staging folder, uploaded, "
                                                            "never read back",
    ("deftx_engine/hub/transfer.py", "push_vector"): "into its staging folder, uploaded, never read back",
    ("webapp/files.py", "FilePolicy.store_upload"): "a hidden mkstemp file renamed onto its content-hash name "
                                                    "(by hand)",
    ("deftx_engine/training/runs.py", "RunDir.log_metrics"): LOG,
    ("deftx_engine/training/progress.py", "run_logger"): LOG,
    ("webapp/jobs.py", "JobRegistry._start_next"): LOG,
    ("benchmarks/crosslingual.py", "_captured"): LOG,
    ("benchmarks/app_perf.py", "App.__init__"): LOG,
    ("benchmarks/core.py", "PeakRSS.__enter__"): "/proc/self/clear_refs, a kernel control file",
}


def file_writes(source: str) -> list[tuple[str, str, int]]:
    """(enclosing function, kind of write, line) of every call in ``source`` that writes a file by itself."""
    import ast

    def mode(call: ast.Call, pos: int) -> str:
        args = [call.args[pos]] if len(call.args) > pos else [k.value for k in call.keywords if k.arg == "mode"]
        return str(args[0].value) if args and isinstance(args[0], ast.Constant) else "r"

    def kind(call: ast.Call) -> str | None:
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
        if name in ("open", "fdopen"):
            writes = set("wax+") & set(mode(call, 0 if isinstance(f, ast.Attribute) and owner != "os" else 1))
            return f"{owner + '.' if owner else ''}{name}(mode with {''.join(sorted(writes))})" if writes else None
        if name in ("write_text", "write_bytes", "save_pretrained", "save_file", "to_csv"):
            return name
        if (owner, name) in (("torch", "save"), ("json", "dump"), ("np", "save")) or (
                owner == "shutil" and name in ("copy", "copy2", "copyfile", "copytree", "move")):
            return f"{owner}.{name}"
        return None

    found, stack = [], []

    class Visitor(ast.NodeVisitor):
        def scoped(self, node):
            stack.append(node.name)
            self.generic_visit(node)
            stack.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = scoped

        def visit_Call(self, node):
            if what := kind(node):
                found.append((".".join(stack) or "<module>", what, node.lineno))
            self.generic_visit(node)

    Visitor().visit(ast.parse(source))
    return found


def test_the_scan_sees_each_kind_of_write():
    src = ("def f(p, out):\n    p.write_text('x')\n    open(out, 'w')\n    open(out)\n    out.open('a')\n"
           "    json.dump({}, fh)\n    model.save_pretrained(out)\n    shutil.copyfile(p, out)\n"
           "    os.fdopen(fd, 'wb')\n    out.read_text()\n")
    assert [w for _, w, _ in file_writes(src)] == ["write_text", "open(mode with w)", "out.open(mode with a)",
                                                  "json.dump", "save_pretrained", "shutil.copyfile",
                                                  "os.fdopen(mode with w)"]


def test_every_file_writer_goes_through_fileio():
    """The README's rule: whatever the engine, the web app and the benchmarks write whole goes through
    deftx_engine/fileio.py (aside, then renamed); a write of its own is allowed only where listed above, with the
    reason. A new direct write (say ``Path(out).write_text(...)`` for a result) fails here."""
    unlisted = []
    for top in ("deftx_engine", "webapp", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "deftx_engine/fileio.py":
                continue
            for function, what, line in file_writes(path.read_text(encoding="utf-8")):
                if (rel, function) not in WRITERS_OUTSIDE_FILEIO:
                    unlisted.append(f"{rel}:{line} ({function}): {what}")
    assert not unlisted, "files written outside deftx_engine/fileio.py:\n" + "\n".join(unlisted)


def test_writers_into_an_atomic_dir_use_one():
    """The listed writers that fill a folder of fileio.atomic_dir really do it inside one."""
    import ast

    for (rel, function), why in WRITERS_OUTSIDE_FILEIO.items():
        if "fileio.atomic_dir" not in why:
            continue
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
        *owner, name = function.split(".")
        scope = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == owner[0]) if owner else tree
        fn = next(n for n in ast.walk(scope) if isinstance(n, ast.FunctionDef) and n.name == name)
        uses = [c for c in ast.walk(fn) if isinstance(c, ast.withitem) and isinstance(c.context_expr, ast.Call)
                and getattr(c.context_expr.func, "id", getattr(c.context_expr.func, "attr", "")) == "atomic_dir"]
        assert uses, f"{rel} {function} writes files but not inside `with atomic_dir(...)`"
