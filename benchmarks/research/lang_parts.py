"""Which part of a language vector costs cross-lingual transfer, and does language arithmetic help?

Why: composing theta0 + phi_task + phi_language (a task vector trained on the source language's sentiment data,
a language vector trained by masked-LM on target-language text) scores *below* the task vector alone on the
NusaX targets. This module answers two questions post hoc, on vectors ``benchmarks.crosslingual`` already
trained (nothing is trained here):

1. **Which part of the language vector does the harm?** Keep only the entries of one part of phi_language,
   compose with the task vector and score macro-F1 on the target's sentiment test split. Parts:

   ==============  ==============================================================================================
   ``embeddings``  ``params.param_group(name) == "embeddings"`` (likewise ``attention``, ``ffn``; ``other`` can
                   be asked for too)
   ``lower``       transformer layers 0 .. L/2 - 1 (``params.layer_of``; L from the base model's configuration,
                   else the highest layer number seen + 1)
   ``upper``       transformer layers L/2 .. L - 1
   ``all``         the whole vector (= the benchmark's ``deftx`` method)
   ``none``        no language vector (= the benchmark's ``task-only`` method; always evaluated: the baseline)
   ==============  ==============================================================================================

   The share of the language vector's entries each part holds is reported beside it.

2. **Language arithmetic**: theta0 + phi_task + s * (phi_target - phi_source), phi_source the source-language
   vector trained with the same settings, for each ``--arith-scales`` s: ``compose(vectors, [1, s, -s])``,
   the same as ``deftx evaluate --task T --language TGT --language SRC --scale 1 s -s``.

Usage::

    python -m benchmarks.research.lang_parts --results RESULTS.json --out PREFIX
    python -m benchmarks.research.lang_parts --results s01.json --source-results s02.json --out /tmp/parts
    python -m benchmarks.research.lang_parts --help                  # every option with its default

``--results`` is a results JSON of ``benchmarks.crosslingual`` (its ``settings`` and ``runs``; a run's vector is
``<folder>/vector``). The task and language vectors are the runs of ``--variant`` and ``--seed``; the source
vector is the language run whose target is the source language, looked up in ``--source-results`` first, then in
``--results`` (none anywhere: question 2 is skipped with a note). Each model is built exactly as the benchmark's
evaluator builds it (``transformers.set_seed`` with the task vector's seed, then
``inference.composed_model``; the test rows sorted by length; the benchmark's evaluation batch size), so ``all``
and ``none`` reproduce the benchmark's ``deftx`` and ``task-only`` scores.

Writes ``PREFIX.json`` (every number) and ``PREFIX.md`` (two tables). Every evaluation is cached in
``PREFIX.cache.jsonl`` keyed by what the model is made of (part or scale, target, vector folders, test file), so
an interrupted or repeated run only evaluates what is missing.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar for each of ~50 models
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python benchmarks/research/lang_parts.py` finds deftx_engine and benchmarks

from benchmarks.common import prefixed, write_outputs  # noqa: E402
from benchmarks.crosslingual import DEFAULT_DATA, _hash, sorted_task_data  # noqa: E402
from deftx_engine.errors import DeftxError  # noqa: E402
from deftx_engine.fileio import atomic_write_text  # noqa: E402
from deftx_engine.method.params import layer_of, param_group  # noqa: E402
from deftx_engine.method.vectors import SparseVector  # noqa: E402
from deftx_engine.training.data import TaskData  # noqa: E402

GROUPS = ("embeddings", "attention", "ffn", "other")  # the values of params.param_group
PARTS = ("embeddings", "attention", "ffn", "lower", "upper", "all", "none")  # the default --parts
CHOICES = PARTS + ("other",)
DEFAULT_SCALES = (1.0, 0.5, 0.25)
# settings of benchmarks.crosslingual that make a language vector (the source vector should share them)
LANG_SETTINGS = {"model": None, "lang_steps": None, "lang_lr": None, "lang_fit_head": None,
                 "lang_mlm_layer": None, "head_corpus": None, "lang_k": None, "lang_groups": "all", "energy": None,
                 "residual_share": None, "fixed_rank": None, "batch_size": None, "max_length": None}


# ---- parts of a vector (pure) -----------------------------------------------------------------------------------
def layer_number(name: str) -> int | None:
    """The transformer layer index of a parameter name, None outside the layers (embeddings, ...)."""
    where = layer_of(name)
    return int(where.split(".")[1]) if where.startswith("layer.") else None


def in_part(name: str, part: str, n_layers: int) -> bool:
    """Whether parameter ``name`` belongs to ``part`` (see the module docstring) of a model of ``n_layers``."""
    if part == "all":
        return True
    if part == "none":
        return False
    if part in GROUPS:
        return param_group(name) == part
    if part in ("lower", "upper"):
        n = layer_number(name)
        return n is not None and (n < n_layers // 2) == (part == "lower")
    raise ValueError(f"unknown part {part!r} (one of {', '.join(CHOICES)})")


def restrict_vector(vec: SparseVector, part: str, n_layers: int) -> SparseVector:
    """A new vector holding only ``vec``'s entries of ``part`` (heads kept); ``vec`` is left as it is.

    The tensors are shared with ``vec``, not copied: neither ``compose`` nor ``apply`` changes its inputs."""
    keep = [n for n in vec.indices if in_part(n, part, n_layers)]
    meta = replace(vec.meta, label_names=list(vec.meta.label_names), denoise=copy.deepcopy(vec.meta.denoise),
                   extra={**copy.deepcopy(vec.meta.extra), "part": part},
                   k=sum(int(vec.indices[n].numel()) for n in keep))
    return SparseVector(meta=meta, indices={n: vec.indices[n] for n in keep},
                        values={n: vec.values[n] for n in keep}, heads=dict(vec.heads),
                        shapes={n: vec.shapes[n] for n in [*keep, *vec.heads]})


def part_shares(vec: SparseVector, parts: Sequence[str], n_layers: int) -> dict[str, float]:
    """Share of ``vec``'s entries (0..1) that each part holds (the groups of ``GROUPS`` sum to 1)."""
    sizes = {n: int(i.numel()) for n, i in vec.indices.items()}
    total = sum(sizes.values())
    return {p: (sum(k for n, k in sizes.items() if in_part(n, p, n_layers)) / total if total else 0.0)
            for p in parts}


def layer_count(base_model: str, names: Sequence[str]) -> int:
    """Transformer layers of the base model: its configuration's ``num_hidden_layers``, else the highest layer
    number among ``names`` + 1."""
    try:
        from transformers import AutoConfig

        from deftx_engine.models.loading import resolve_model

        n = getattr(AutoConfig.from_pretrained(resolve_model(base_model)), "num_hidden_layers", None)
        if isinstance(n, int) and n > 0:
            return n
    except (DeftxError, OSError, ValueError, KeyError):
        pass
    seen = [k for k in map(layer_number, names) if k is not None]
    return max(seen) + 1 if seen else 0


# ---- tables (pure) ----------------------------------------------------------------------------------------------
def average(row: dict[str, float], targets: Sequence[str]) -> float | None:
    """Mean of ``row`` over ``targets``; None when a target is missing."""
    return statistics.mean(row[t] for t in targets) if targets and all(t in row for t in targets) else None


def _num(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else f"{x:+.1f}" if signed else f"{x:.1f}"


def score_table(rows: dict[str, dict[str, float]], targets: Sequence[str], baseline: dict[str, float],
                label: str, extra: dict[str, str] | None = None, extra_name: str = "") -> str:
    """Markdown table: one row per entry of ``rows`` (label -> {target: macro-F1 x 100}), a column per target,
    the average over the targets and its difference to ``baseline``'s average; ``extra`` (label -> text) adds
    a column ``extra_name`` after the label."""
    base = average(baseline, targets)
    extra_col = [extra_name] if extra is not None else []
    lines = ["| " + " | ".join([label, *extra_col, *targets, "avg", "Δ avg vs none"]) + " |",
             "|---" + "|---:" * (len(extra_col) + len(targets) + 2) + "|"]
    for name, row in rows.items():
        avg = average(row, targets)
        delta = None if avg is None or base is None else avg - base
        cells = [name, *([extra.get(name, "–")] if extra is not None else []),
                 *(_num(row.get(t)) for t in targets), f"**{_num(avg)}**", _num(delta, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scale_label(s: float) -> str:
    return f"{s:g}"


def markdown(result: dict) -> str:
    """The report: the parts table and the arithmetic table (see ``main`` for ``result``)."""
    st, targets = result["settings"], result["settings"]["targets"]
    parts = result["parts"]
    none = parts["none"]["targets"]
    share = {p: _num(100 * statistics.mean(r["share"].values())) if r["share"] else "–" for p, r in parts.items()}
    lines = [f"# Parts of the language vector and language arithmetic ({st['model']}, seed {st['seed']}, "
             f"variant {st['variant']})", "",
             f"{result['meta']['date']}; results `{st['results']}`; task vector `{result['vectors']['task']}`; "
             f"source {st['source']}; {st['n_layers']} transformer layers (lower = 0–{st['n_layers'] // 2 - 1}, "
             f"upper = {st['n_layers'] // 2}–{st['n_layers'] - 1}); language-vector scale {st['lang_scale']:g}; "
             f"{result['meta']['evaluated']} evaluations run, {result['meta']['cached']} from the cache; "
             f"{result['meta']['eval_seconds']:.0f} s of evaluation (cached ones as first measured), "
             f"this invocation {result['meta']['wall_seconds']:.0f} s.", "",
             "Macro-F1 × 100 of θ0 + φ_task + (the part of φ_lang), on each target's sentiment test split "
             "(`none`: the task vector alone; `all`: the whole language vector).", "",
             score_table({p: r["targets"] for p, r in parts.items()}, targets, none, "part", share,
                         "entries of φ_lang % (mean over targets)")]
    ar = result["arithmetic"]
    lines += ["", "Language arithmetic: macro-F1 × 100 of θ0 + φ_task + s·(φ_target − φ_source)."]
    if "skipped" in ar:
        lines += ["", f"Skipped: {ar['skipped']}"]
    else:
        rows = {"none (task only)": none, **{f"s = {k}": r["targets"] for k, r in ar["scales"].items()}}
        lines += [f"φ_source: `{ar['source_vector']}`" + (f" (from `{ar['source_results']}`)"
                                                          if ar.get("source_results") else "") + ".", ""]
        lines += [score_table(rows, targets, none, "scale")]
        if ar.get("settings_differ"):
            lines += ["", "Warning: the source vector's run differs in " + ", ".join(
                f"{k} ({a!r} vs {b!r})" for k, (a, b) in ar["settings_differ"].items()) + "."]
    return "\n".join(lines) + "\n"


# ---- inputs -----------------------------------------------------------------------------------------------------
def read_results(path: Path) -> dict:
    """A results JSON of benchmarks.crosslingual; a missing or malformed file is an error naming it."""
    if not path.is_file():
        raise SystemExit(f"error: {path}: results file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict) or \
            not isinstance(data.get("runs"), list):
        raise SystemExit(f"error: {path}: not a benchmarks.crosslingual results file (no settings and runs)")
    return data


def find_vector(results: dict, where: Path, kind: str, variant: str, seed: int, target: str | None) -> Path | None:
    """``<folder>/vector`` of the matching run (None if no run matches); a listed but missing folder is an error."""
    for r in results["runs"]:
        if (r.get("kind"), r.get("variant"), r.get("seed"), r.get("target")) == (kind, variant, seed, target):
            folder = Path(r["folder"]) / "vector"
            if not folder.is_dir():
                what = f"{kind} {variant} seed {seed}" + (f" {target}" if target else "")
                raise SystemExit(f"error: {folder}: vector folder not found (run {what} of {where})")
            return folder
    return None


def settings_differ(a: dict, b: dict) -> dict[str, tuple]:
    """The language-vector settings in which two results files differ (missing fields at their default)."""
    return {k: (a.get(k, d), b.get(k, d)) for k, d in LANG_SETTINGS.items() if a.get(k, d) != b.get(k, d)}


# ---- evaluation ---------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One model to score: theta0 + sum(scale * vector) on a target's test file."""

    what: str  # "part" | "arith"
    label: str  # the part, or the scale as text
    target: str
    languages: list[Path]
    scales: list[float]


class Scorer:
    """Builds and scores composed models; every result is cached in a JSON-lines file keyed by its inputs."""

    def __init__(self, cache: Path, task: Path, seed: int, batch_size: int, n_layers: int, precision: str):
        self.cache, self.task, self.seed, self.batch_size, self.n_layers = cache, task, seed, batch_size, n_layers
        self.precision = precision  # the crosslingual run's: its scores are what "none" and "deftx" reproduce
        self.entries: dict[str, dict] = {}
        self.vectors: dict[Path, SparseVector] = {}
        self.data: dict[Path, TaskData] = {}
        self.evaluated = self.cached = 0
        if cache.is_file():
            for line in cache.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(e, dict) and "key" in e:
                    self.entries[e["key"]] = e

    def vector(self, path: Path) -> SparseVector:
        if path not in self.vectors:
            self.vectors[path] = SparseVector.load(path)
        return self.vectors[path]

    def key(self, job: Job, test: Path) -> str:
        return _hash([job.what, job.label, job.target, str(self.task), [str(p) for p in job.languages], job.scales,
                      str(test), test.stat().st_size]
                     + ([self.precision] if self.precision != "fp32" else []))  # fp32: as recorded before

    def score(self, job: Job, test: Path) -> dict:
        """The cached result of ``job``, or a new evaluation (written to the cache at once)."""
        key = self.key(job, test)
        if key in self.entries:
            self.cached += 1
            return {**self.entries[key], "cached": True}
        from transformers import set_seed

        from deftx_engine.outputs.inference import composed_model, evaluate_task_data

        t = time.perf_counter()
        langs = [self.vector(p) for p in job.languages]
        if job.what == "part":
            langs = [restrict_vector(v, job.label, self.n_layers) for v in langs]
        set_seed(self.seed)  # same init as training for any weight the checkpoint lacks
        model, tok = composed_model(self.vector(self.task), langs, job.scales)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if test not in self.data:
            self.data[test] = sorted_task_data(test, names)
        m = evaluate_task_data(model, tok, self.data[test], batch_size=self.batch_size, precision=self.precision)
        entry = {"key": key, "what": job.what, "label": job.label, "target": job.target,
                 "task": str(self.task), "languages": [str(p) for p in job.languages], "scales": job.scales,
                 "test": str(test), "macro_f1": m["macro_f1"], "accuracy": m["accuracy"], "n": m["n"],
                 "confusion": m["confusion"], "eval_seconds": time.perf_counter() - t}
        self.entries[key] = entry
        atomic_write_text(self.cache, "".join(json.dumps(e) + "\n" for e in self.entries.values()))
        self.evaluated += 1
        return {**entry, "cached": False}


# ---- the command ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", required=True, help="results JSON of benchmarks.crosslingual")
    p.add_argument("--source-results", help="another results JSON holding the source-language vector "
                                            "(default: look in --results)")
    p.add_argument("--seed", type=int, default=1, help="seed of the runs to read")
    p.add_argument("--variant", default="deftx", help="variant of the task and language runs to read")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="NusaX folder (sentiment/<target>/test.csv)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(CHOICES),
                   help="parts of the language vector to score (none is always scored: the baseline)")
    p.add_argument("--arith-scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                   help="scales s of theta0 + phi_task + s * (phi_target - phi_source)")
    p.add_argument("--out", required=True, help="output prefix: PREFIX.json, PREFIX.md, PREFIX.cache.jsonl")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    res_path = Path(args.results).expanduser()
    results = read_results(res_path)
    st = results["settings"]
    targets, source = list(st["targets"]), st["source"]
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise SystemExit(f"error: --out {out}: the folder {out.parent} does not exist")
    tests = {t: Path(args.data).expanduser() / "sentiment" / t / "test.csv" for t in targets}
    for t, f in tests.items():
        if not f.is_file():
            raise SystemExit(f"error: {f}: test file of target {t!r} not found (--data must be the NusaX folder)")
    task = find_vector(results, res_path, "task", args.variant, args.seed, None)
    if task is None:
        raise SystemExit(f"error: {res_path}: no task run of variant {args.variant!r}, seed {args.seed}")
    langs = {}
    for t in targets:
        langs[t] = find_vector(results, res_path, "language", args.variant, args.seed, t)
        if langs[t] is None:
            raise SystemExit(f"error: {res_path}: no language run of variant {args.variant!r}, seed {args.seed}, "
                             f"target {t!r}")
    src, src_from, differ = None, None, {}
    tries = [Path(args.source_results).expanduser()] if args.source_results else []
    for path in [*tries, res_path]:
        data = results if path == res_path else read_results(path)
        src = find_vector(data, path, "language", args.variant, args.seed, source)
        if src is not None:
            src_from, differ = path, settings_differ(st, data["settings"])
            break

    task_vec = SparseVector.load(task)
    n_layers = layer_count(task_vec.meta.base_model, list(task_vec.indices))
    scorer = Scorer(prefixed(out, ".cache.jsonl"), task, args.seed, int(st.get("eval_batch_size", 32)), n_layers,
                    st.get("precision", "fp32"))
    scorer.vectors[task] = task_vec
    lang_scale = float(st.get("lang_scale", 1.0))
    parts = ["none", *[p for p in dict.fromkeys(args.parts) if p != "none"]]
    print(f"lang_parts: {res_path.name}, {source} -> {', '.join(targets)}, seed {args.seed}, variant {args.variant}; "
          f"{n_layers} layers", flush=True)
    if src is None:
        note = (f"no language run of variant {args.variant!r}, seed {args.seed}, target {source!r} (the source) in "
                + " or ".join(str(p) for p in [*tries, res_path]))
        print(f"  note: language arithmetic skipped: {note}", flush=True)
    elif differ:
        print(f"  warning: the source vector's results file {src_from} differs in {', '.join(differ)}", flush=True)

    evaluations: list[dict] = []

    def run(job: Job) -> float:
        e = scorer.score(job, tests[job.target])
        evaluations.append(e)
        how = "cached" if e["cached"] else f"{e['eval_seconds']:.0f}s"
        print(f"  {job.target:<10} {job.what} {job.label:<11} {100 * e['macro_f1']:5.1f}  ({how})", flush=True)
        return 100 * e["macro_f1"]

    part_rows: dict[str, dict] = {p: {"targets": {}, "share": {}} for p in parts}
    arith: dict = {"skipped": note} if src is None else {
        "source_vector": str(src), "source_results": str(src_from) if src_from != res_path else None,
        "settings_differ": differ, "scales": {scale_label(s): {"targets": {}} for s in args.arith_scales}}
    shares_all: dict[str, dict[str, float]] = {}
    for t in targets:
        shares = shares_all[t] = part_shares(scorer.vector(langs[t]), [*CHOICES], n_layers)
        for p in parts:
            job = Job("part", p, t, [] if p == "none" else [langs[t]], [1.0] if p == "none" else [1.0, lang_scale])
            part_rows[p]["targets"][t] = run(job)
            part_rows[p]["share"][t] = shares[p]
        if src is not None:
            for s in args.arith_scales:
                job = Job("arith", scale_label(s), t, [langs[t], src], [1.0, s, -s])
                arith["scales"][scale_label(s)]["targets"][t] = run(job)
    base = average(part_rows["none"]["targets"], targets)
    for row in [*part_rows.values(), *arith.get("scales", {}).values()]:
        row["avg"] = average(row["targets"], targets)
        row["delta_vs_none"] = None if row["avg"] is None or base is None else row["avg"] - base
    result = {"settings": {"results": str(res_path), "source_results": args.source_results, "seed": args.seed,
                           "variant": args.variant, "data": str(Path(args.data).expanduser()), "parts": parts,
                           "arith_scales": list(args.arith_scales), "model": st.get("model"), "source": source,
                           "targets": targets, "n_layers": n_layers, "lang_scale": lang_scale},
              "vectors": {"task": str(task), "languages": {t: str(p) for t, p in langs.items()},
                          "source": str(src) if src else None},
              "shares": shares_all, "parts": part_rows, "arithmetic": arith, "evaluations": evaluations,
              "meta": {"date": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                       "wall_seconds": time.perf_counter() - t0,
                       "eval_seconds": sum({e["key"]: e["eval_seconds"] for e in evaluations}.values()),
                       "evaluated": scorer.evaluated,
                       "cached": scorer.cached}}
    write_outputs(out, result, markdown(result))
    print(f"results: {prefixed(out, '.json')}, {prefixed(out, '.md')}")
    return result


if __name__ == "__main__":
    main()
