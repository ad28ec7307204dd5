"""Mutation testing of the engine core with mutmut 3; run it through scripts/mutation.sh (which installs mutmut).

For each module it
  1. copies a snapshot of deftx_engine/, tests/, assets/ and pyproject.toml into <out>/work/<module>/ (so the
     repository itself is never touched and edits made during a run do not leak into it),
  2. rewrites, in that snapshot only, functions with decorators other than @staticmethod/@classmethod
     (``@torch.no_grad() def step``, ``@property``, ``@contextlib.contextmanager``) to an undecorated
     ``<name>_undecorated`` plus ``<name> = decorator(<name>_undecorated)``: mutmut 3 never mutates decorated
     functions, and this is where SparseAdamW.step, SparseVector.apply/revert live (--no-unwrap turns it off),
  3. appends a [tool.mutmut] section to the snapshot's pyproject.toml (only this module is mutated; the tests
     are the fast engine tests; mutmut runs each mutant against the tests that call the mutated function),
  4. runs ``mutmut run`` there and collects ``mutmut results`` and ``mutmut show`` for every survivor.

Score = killed / (total - equivalent). Mutants judged equivalent are listed in scripts/mutation_equivalent.txt as
``<mutant name> <diff hash> <reason>``; an entry counts only while that mutant survives with the same diff.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the core of the method (vector_meta holds what vectors.py read and checked before issue 23)
MODULES = ["denoise", "masks", "optim", "vectors", "vector_meta", "merge", "embedding_rows", "mlm_head"]
FAST_TESTS = ["tests/engine/method/test_denoise.py", "tests/engine/method/test_masks.py",
              "tests/engine/method/test_optim.py", "tests/engine/method/test_vectors.py",
              "tests/engine/method/test_vector_meta.py", "tests/engine/method/test_merge.py",
              "tests/engine/method/test_embedding_rows.py", "tests/engine/models/test_mlm_head.py"]
SLOW_TESTS = ["tests/engine/method/test_mask_choice.py"]  # trains a tiny model (~10 s per parameter)
EQUIVALENT_FILE = ROOT / "scripts" / "mutation_equivalent.txt"
COPY = ["deftx_engine", "tests", "assets"]
STATUSES = ["killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped",
            "caught by type check", "check was interrupted by user", "not checked"]


def unwrap_decorators(source: str) -> tuple[str, list[str]]:
    """``@d1 @d2 def f`` -> ``def f_undecorated`` + ``f = d1(d2(f_undecorated))`` for top-level functions and
    methods (not @staticmethod/@classmethod alone, which mutmut handles). Same behaviour, mutable by mutmut."""
    import libcst as cst

    changed: list[str] = []

    def rewrite(body: list, where: str) -> list:
        out = []
        for stmt in body:
            if isinstance(stmt, cst.ClassDef):
                inner = rewrite(list(stmt.body.body), f"{where}{stmt.name.value}.")
                stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
            elif isinstance(stmt, cst.FunctionDef) and stmt.decorators:
                decs = [d.decorator for d in stmt.decorators]
                if not (len(decs) == 1 and isinstance(decs[0], cst.Name)
                        and decs[0].value in ("staticmethod", "classmethod")):
                    name = stmt.name.value
                    expr = f"{name}_undecorated"
                    for d in reversed(decs):
                        expr = f"({cst.Module([]).code_for_node(d)})({expr})"
                    out.append(stmt.with_changes(decorators=[], name=cst.Name(f"{name}_undecorated")))
                    out.append(cst.parse_statement(f"{name} = {expr}\n"))
                    changed.append(f"{where}{name}")
                    continue
            out.append(stmt)
        return out

    module = cst.parse_module(source)
    return module.with_changes(body=rewrite(list(module.body), "")).code, changed


def module_path(name: str) -> str | None:
    """A module's short name (``denoise``) or its path in its layer (``method/denoise``), .py or not, to its file
    (``deftx_engine/method/denoise.py``); None unless exactly one engine module has that name."""
    stem = name.removesuffix(".py")
    found = [p for p in (ROOT / "deftx_engine").glob(f"**/{stem}.py") if p.name != "__init__.py"]
    return found[0].relative_to(ROOT).as_posix() if len(found) == 1 else None


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(work: Path, module: str, tests: list[str], args) -> list[str]:
    """Fresh snapshot in ``work`` (or refresh one kept from an earlier run with --keep)."""
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src, dst = ROOT / name, work / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = work / module_path(module)
    unwrapped: list[str] = []
    if not args.no_unwrap:
        code, unwrapped = unwrap_decorators(target.read_text())
        target.write_text(code)
    pyproject = (ROOT / "pyproject.toml").read_text()
    # drop a [tool.mutmut] section the project may grow one day; the one below is generated per module
    pyproject = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", pyproject)
    pyproject += f"""
[tool.mutmut]
source_paths = ["deftx_engine"]
only_mutate = ["{module_path(module)}"]
pytest_add_cli_args_test_selection = {toml_list(tests)}
pytest_add_cli_args = ["-p", "no:cacheprovider"]
also_copy = ["assets/"]
# torch is not fork-safe once used: fork every mutant from a server that only imported and collected the tests
process_isolation = "forkserver"
use_git_change_detection = false
timeout_multiplier = {args.timeout_multiplier}
"""
    (work / "pyproject.toml").write_text(pyproject)
    (work / "tmp").mkdir(exist_ok=True)
    return unwrapped


def mutmut(work: Path, *argv: str, log=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # one thread per test process: fork-safe torch, and no oversubscription of the machine
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(work / "tmp"),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("MUTANT_UNDER_TEST", None)
    exe = Path(sys.executable).with_name("mutmut")
    kwargs = dict(stdout=log, stderr=subprocess.STDOUT) if log else dict(capture_output=True)
    return subprocess.run([str(exe), *argv], cwd=work, env=env, text=True, **kwargs)


DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in json.load(sys.stdin)}))
"""


def mutant_diffs(work: Path, names: list[str]) -> dict[str, str]:
    """``mutmut show``'s diff of each mutant, read in one process (``mutmut show`` per mutant is slow)."""
    if not names:
        return {}
    res = subprocess.run([sys.executable, "-c", DIFFS], cwd=work, input=json.dumps(names), capture_output=True,
                         text=True)
    if res.returncode == 0:
        return json.loads(res.stdout)
    return {n: mutmut(work, "show", n).stdout for n in names}  # fallback: one `mutmut show` each


def diff_hash(diff: str) -> str:
    """Hash of a mutant's changed lines (not its name: names are renumbered when a function changes)."""
    lines = [ln[0] + ln[1:].strip() for ln in diff.splitlines()
             if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def load_equivalents() -> dict[str, tuple[str, str]]:
    out = {}
    if EQUIVALENT_FILE.exists():
        for line in EQUIVALENT_FILE.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, h, *reason = line.split(None, 2)
                out[name] = (h, reason[0] if reason else "")
    return out


def run_module(module: str, tests: list[str], args, equivalents) -> dict:
    out = Path(args.out).resolve()
    work, report = out / "work" / module, out / "reports" / module
    report.mkdir(parents=True, exist_ok=True)
    old = json.loads((report / "summary.json").read_text()) if (report / "summary.json").exists() else {}
    if args.report_only:
        if not (work / "mutants").is_dir():
            raise SystemExit(f"[{module}] no earlier run in {work}")
        unwrapped, rc, seconds = old.get("undecorated", []), old.get("mutmut_rc", 0), old.get("seconds", 0)
    else:
        unwrapped = prepare(work, module, tests, args)
        if unwrapped:
            print(f"[{module}] undecorated for mutation: {', '.join(unwrapped)}", flush=True)
        cmd = ["run", "--max-children", str(args.max_children)]
        where = work.relative_to(ROOT) if work.is_relative_to(ROOT) else work
        print(f"[{module}] mutmut {' '.join(cmd)}  (in {where}; log {report / 'run.log'})", flush=True)
        t0 = time.time()
        with open(report / "run.log", "w") as log:
            rc = mutmut(work, *cmd, log=log).returncode
        seconds = round(time.time() - t0)
    res = mutmut(work, "results", "--all", "true")
    status = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s+(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    if rc != 0 or not status:
        tail = (report / "run.log").read_text()[-3000:]
        print(f"[{module}] mutmut run failed (rc={rc}); end of {report / 'run.log'}:\n{tail}", file=sys.stderr)
    counts = Counter(status.values())
    survivors, equivalent = [], []
    diffs = mutant_diffs(work, [n for n, st in status.items() if st != "killed"])
    with open(report / "survivors.md", "w") as md:
        md.write(f"# Surviving mutants of {module_path(module)}\n\n")
        for name, st in sorted(status.items()):
            if st in ("killed",):
                continue
            diff = diffs.get(name, "")
            h = diff_hash(diff)
            eq = equivalents.get(name)
            is_eq = st == "survived" and eq is not None and eq[0] == h
            if is_eq:
                equivalent.append(name)
            elif st == "survived":
                survivors.append(name)
            md.write(f"## {name} ({st}, diff {h}{', equivalent: ' + eq[1] if is_eq else ''})\n\n"
                     f"```diff\n{diff.strip()}\n```\n\n")
    total = len(status)
    denom = total - len(equivalent)
    summary = dict(module=module_path(module), tests=tests, total=total, killed=counts["killed"],
                   survived=counts["survived"], timeout=counts["timeout"], no_tests=counts["no tests"],
                   other={k: v for k, v in counts.items()
                          if k not in ("killed", "survived", "timeout", "no tests")},
                   equivalent=len(equivalent), equivalent_names=equivalent, open_survivors=survivors,
                   score=round(counts["killed"] / denom, 4) if denom else None, seconds=seconds,
                   undecorated=unwrapped, mutmut_rc=rc)
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_table(rows: list[dict], out: Path) -> None:
    head = "| module | total | killed | survived | timeout | no tests | other | equivalent | score | time |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        score = "n/a" if r["score"] is None else f"{r['score']:.1%}"
        other = sum(r["other"].values())
        lines.append(f"| {r['module']} | {r['total']} | {r['killed']} | {r['survived']} | {r['timeout']} | "
                     f"{r['no_tests']} | {other} | {r['equivalent']} | {score} | {r['seconds']} s |")
    text = "\n".join(lines)
    print(text)
    print("score = killed / (total - equivalent); survivors' diffs: <out>/reports/<module>/survivors.md")
    (out / "reports" / "summary.md").write_text(text + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", default=MODULES,
                    help=f"modules of deftx_engine by short name, e.g. denoise (default: {MODULES})")
    ap.add_argument("--out", default=".mutation", help="output folder (git-ignored)")
    ap.add_argument("--with-mask-choice", action="store_true", help=f"also run {SLOW_TESTS[0]} (slow)")
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    ap.add_argument("--timeout-multiplier", type=float, default=15.0,
                    help="a mutant times out after (its tests' clean time + 1 s) x this x 2 CPU seconds")
    ap.add_argument("--keep", action="store_true",
                    help="reuse an earlier run's verdicts for unchanged functions (mutmut does not notice "
                         "changed tests: use it to resume, not after editing tests)")
    ap.add_argument("--no-unwrap", action="store_true", help="leave decorated functions alone (mutmut skips them)")
    ap.add_argument("--report-only", action="store_true",
                    help="do not run mutmut: re-read the last run's results (e.g. after editing "
                         "scripts/mutation_equivalent.txt)")
    args = ap.parse_args()
    unknown = [m for m in args.modules if module_path(m) is None]
    if unknown:
        ap.error(f"no such module in deftx_engine/ (or more than one): {unknown}")
    args.modules = [Path(m).stem for m in args.modules]  # the short name names the work and report folders
    tests = FAST_TESTS + (SLOW_TESTS if args.with_mask_choice else [])
    if args.report_only:
        args.modules = [m for m in args.modules
                        if (Path(args.out) / "work" / m / "mutants").is_dir()]
    equivalents = load_equivalents()
    rows = []
    for module in args.modules:
        rows.append(run_module(module, tests, args, equivalents))
        r = rows[-1]
        print(f"[{module}] total {r['total']}, killed {r['killed']}, survived {r['survived']}, timeout "
              f"{r['timeout']}, equivalent {r['equivalent']}, score {r['score']}", flush=True)
    out = Path(args.out).resolve()
    previous = out / "reports" / "summary.json"
    merged = {r["module"]: r for r in (json.loads(previous.read_text()) if previous.exists() else [])}
    merged.update({r["module"]: r for r in rows})
    previous.write_text(json.dumps(list(merged.values()), indent=2) + "\n")
    print_table(list(merged.values()), out)
    return 0 if all(r["mutmut_rc"] == 0 and r["total"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
