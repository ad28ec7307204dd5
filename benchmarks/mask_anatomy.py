"""Mask anatomy: where each mask's entries are, per parameter group, in the vectors a crosslingual run trained.

Usage (the crosslingual command line, with the module name changed, finds the same runs; nothing is trained)::

    python -m benchmarks.mask_anatomy --model multilingual-e5-small --targets javanese sundanese balinese \\
        acehnese madurese --seeds 3 --methods deftx deftx-matrix lt-sft --work-dir W

Why: the overall overlap of two masks hides where their entries are. On a 250k-piece vocabulary most maskable
entries are word embeddings, so a denoising step that leaves the embedding matrix alone barely changes the mask
(``deftx_engine/method/denoise.py``, ``residual_scope``). Three tables, per group (embeddings / attention / ffn),
mean +/- sample std over every (seed, target) pair that has finished:

- where the entries are: share of each variant's language and task masks in each group;
- also in LT-SFT's mask: share of a variant's mask entries (in the group) that LT-SFT's mask of the same seed
  (and target) also holds -- how far denoising moved the mask;
- language ∩ task: share of the language mask's entries (in the group) that the task mask of the same variant
  and seed also holds (the paper reads ~5 % as "denoised enough").

Writes ``<work-dir>/<model>/anatomy.{json,md}`` and prints the tables.
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.crosslingual import Job, build_parser, plan_jobs, settings_from  # noqa: E402
from deftx_engine.fileio import atomic_write_text, write_json_atomic  # noqa: E402
from deftx_engine.method.masks import overlap  # noqa: E402
from deftx_engine.method.params import param_group  # noqa: E402
from deftx_engine.method.vectors import SparseVector  # noqa: E402

GROUPS = ("embeddings", "attention", "ffn")


def group_shares(mask: dict) -> dict[str, float]:
    """Share of the mask's entries in each group (and "other")."""
    counts: dict[str, int] = defaultdict(int)
    for name, idx in mask.items():
        counts[param_group(name)] += int(idx.numel())
    total = sum(counts.values()) or 1
    return {g: counts[g] / total for g in (*GROUPS, "other")}


def shared_by_group(a: dict, b: dict) -> dict[str, float]:
    """Share of ``a``'s entries that ``b`` also holds: overall and in each group (NaN where ``a`` has none)."""
    o = overlap(a, b)
    out = {"overall": o["overall"]["share_of_a"], "jaccard": o["overall"]["jaccard"]}
    for g in GROUPS:
        c = o["per_group"].get(g)
        out[g] = c["share_of_a"] if c and c["a"] else float("nan")
    return out


def anatomy(jobs: list[Job]) -> dict:
    """The three tables' raw values: {table: {row: {column: [values over (seed, target)]}}}."""
    by = {(j.kind, j.variant, j.seed, j.target): j for j in jobs if j.kind != "full-ft" and j.done}
    masks: dict[tuple, dict] = {}

    def mask(key: tuple) -> dict:
        if key not in masks:
            masks[key] = SparseVector.load(by[key].folder / "vector").mask()
        return masks[key]

    tables: dict[str, dict] = {"where": defaultdict(lambda: defaultdict(list)),
                               "in_lt_sft": defaultdict(lambda: defaultdict(list)),
                               "language_task": defaultdict(lambda: defaultdict(list))}
    for key in sorted(by, key=str):
        kind, variant, seed, target = key
        for col, v in group_shares(mask(key)).items():
            tables["where"][f"{variant} {kind}"][col].append(v)
        ref = (kind, "lt-sft", seed, target)
        if variant != "lt-sft" and ref in by:
            for col, v in shared_by_group(mask(key), mask(ref)).items():
                tables["in_lt_sft"][f"{variant} {kind}"][col].append(v)
        task = ("task", variant, seed, None)
        if kind == "language" and task in by:
            for col, v in shared_by_group(mask(key), mask(task)).items():
                tables["language_task"][variant][col].append(v)
        if kind == "language":  # task masks are read for every target; a language mask's work is done
            masks.pop(key, None)
    return {t: {r: dict(c) for r, c in rows.items()} for t, rows in tables.items()}


def _cell(values: list[float]) -> str:
    vals = [100 * v for v in values if v == v]  # NaN: the group has no entries there
    if not vals:
        return "–"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


TITLES = {"where": ("Where the entries are (% of the mask in each group)", [*GROUPS, "other"]),
          "in_lt_sft": ("Also in LT-SFT's mask (% of the variant's entries in the group)", ["overall", *GROUPS]),
          "language_task": ("Language ∩ task (% of the language mask's entries in the group)",
                            ["overall", *GROUPS, "jaccard"])}


def markdown(tables: dict) -> str:
    out = []
    for name, (title, cols) in TITLES.items():
        rows = tables.get(name, {})
        if not rows:
            continue
        n = max(len(v) for c in rows.values() for v in c.values())
        out += [f"**{title}**, mean ± std over {n} (seed, target) pairs", "",
                "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        out += [f"| {row} | " + " | ".join(_cell(c.get(col, [])) for col in cols) + " |" for row, c in rows.items()]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    s, paths, work = settings_from(args)
    jobs = plan_jobs(s, paths, work)
    done = [j for j in jobs if j.done]
    print(f"mask anatomy: {len(done)} of {len(jobs)} runs finished under {work}", flush=True)
    tables = anatomy(jobs)
    text = markdown(tables)
    write_json_atomic(work / "anatomy.json", tables)
    atomic_write_text(work / "anatomy.md", text + "\n")
    print(text)
    return tables


if __name__ == "__main__":
    main()
