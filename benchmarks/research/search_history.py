"""One table from several ``benchmarks.crosslingual`` results files: the history of a recipe search.

Usage::

    python -m benchmarks.research.search_history OUT/s01.json OUT/s02.json ...   # markdown on stdout

Each row is one method of one results file: the settings that differ between the files, macro-F1 x 100 per
target and on average, the gain over task-only of the same file (when it ran task-only), and the language
vectors' held-out masked-token loss (theta0 -> theta0 + phi, and with theta0's head).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("lang_steps", "lang_lr", "lang_k", "lang_mlm_layer", "lang_groups", "lang_fit_head", "head_corpus",
        "lang_scale",
        "task_steps", "task_lr", "seeds")


def _setting(s: dict, key: str) -> str:
    v = s.get(key)
    if key == "head_corpus":
        return "own" if v is None else Path(str(v)).stem
    if key == "seeds":
        return ",".join(map(str, v))
    if v is None and key in ("lang_mlm_layer", "lang_groups"):  # unset, or a file from before the option
        return {"lang_mlm_layer": "last", "lang_groups": "all"}[key]
    return str(v)


def table(files: list[Path]) -> str:
    results = [(f, json.loads(f.read_text(encoding="utf-8"))) for f in files]
    varying = [k for k in KEYS if len({_setting(r["settings"], k) for _, r in results}) > 1] or ["lang_steps"]
    targets = results[0][1]["settings"]["targets"]
    head = ["run", "method", *varying, *targets, "avg", "Δ vs task-only", "held-out MLM loss θ0 → θ0+φ (θ0 head)"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for f, r in results:
        summary, s = r["summary"], r["settings"]
        base = summary.get("task-only", {}).get("average", [None])[0]
        for name, row in summary.items():
            avg = row["average"][0]
            gain = "–" if base is None or name == "task-only" else f"{avg - base:+.1f}"
            mlm = row.get("lang_mlm")
            cells = [f.stem, name, *(_setting(s, k) for k in varying),
                     *(f"{row['targets'][t][0]:.1f}" for t in targets), f"**{avg:.1f}**", gain,
                     f"{mlm['theta0']:.2f} → {mlm['theta0+phi']:.2f} ({mlm['encoder_only']:.2f})" if mlm else "–"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="results .json files of benchmarks.crosslingual")
    return p


def main(argv: list[str] | None = None) -> None:
    print(table(build_parser().parse_args(argv).files), end="")


if __name__ == "__main__":
    main()
