"""benchmarks/research/recipe_search.sh (hours of training) is checked without training: bash parses it, and its dry run
(DRY_RUN=1) prints every benchmark command it would run; each must be accepted by its benchmark's parser, and
each benchmarks.crosslingual command must plan its runs on the real NusaX data (its own --dry-run)."""
import importlib
import os
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "research" / "recipe_search.sh"


def dry_run(work: Path) -> list[list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), str(work)], env=dict(os.environ, DRY_RUN="1"), capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


def test_the_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_every_command_is_accepted_by_its_benchmark(tmp_path, capsys):
    commands = dry_run(tmp_path / "work")
    assert not (tmp_path / "work").exists()  # the dry run ran nothing
    modules = [c[2] for c in commands]
    assert all(c[:2] == ["python", "-m"] for c in commands), commands
    assert modules.count("benchmarks.crosslingual") == 11 and modules.count("benchmarks.research.lang_parts") == 3
    assert modules.count("benchmarks.research.lang_diagnostics") == 3
    assert modules.count("benchmarks.research.search_history") == 1
    outs = [c[c.index("--out") + 1] for c in commands if "--out" in c]
    assert len(outs) == len(set(outs)) == 17  # no command overwrites another's results
    for cmd in commands:
        parser = importlib.import_module(cmd[2]).build_parser()
        parser.parse_args(cmd[3:])  # exits (fails the test) on an option the benchmark does not have
    capsys.readouterr()


def test_every_crosslingual_command_plans_its_runs_on_nusax(nusax_dir, tmp_path, capsys):
    from benchmarks import crosslingual

    for cmd in dry_run(tmp_path / "work"):
        if cmd[2] == "benchmarks.crosslingual":
            plan = crosslingual.main([*cmd[3:], "--data", str(nusax_dir), "--dry-run"])
            assert plan["jobs"] > 0, cmd
    capsys.readouterr()
