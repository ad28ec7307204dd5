"""What does a language vector do to the representations? Diagnostics for the negative result that language
vectors trained by masked-LM on target-language text lower held-out MLM loss but do not help (and cost macro-F1
in) zero-shot sentiment transfer.

Usage::

    python -m benchmarks.research.lang_diagnostics --task TASK_VECTOR \\
        --lang javanese=JAV_VECTOR --lang sundanese=SUN_VECTOR --out /tmp/diag
    python -m benchmarks.research.lang_diagnostics --help          # every option with its default

Text: NusaX-MT's *valid* split (``<data>/mt/valid.csv``, parallel sentences, one column per language). The
language vectors were trained on ``mt/train.csv``, so these sentences are held out. Rows where the source or
the target is empty are left out (per target).

Measured per target language (sentence representation = mean of the last hidden state over non-padding
tokens, as e5 pools, unless said otherwise):

1. movement: mean cosine between a target sentence's representation under theta0 and under
   theta0 + phi_lang (1.0: the vector does not move it), also per layer (0 = embeddings), and the same for
   the *source* sentences as a control (does the vector move every language, or only its own?);
2. cross-lingual alignment, target -> source among the parallel sentences: top-1 retrieval accuracy by cosine,
   mean cosine of translation pairs, of non-pairs, and their difference (the margin), for
   ``base`` (target and source under theta0), ``lang`` (target under theta0 + phi_lang, source under theta0:
   what the task vector, trained on theta0's source representations, meets), ``task`` (both under
   theta0 + phi_task) and ``composed`` (target under theta0 + phi_task + phi_lang, source under theta0 + phi_task);
3. classifier-input shift: cosine between target sentences' features under theta0 + phi_task and under
   theta0 + phi_task + phi_lang, for what the classification head reads (the pooler output for BERT-style
   models, else the last hidden state at position 0), for the position-0 state and for the mean-pooled one;
   per layer; and how many predicted labels change (NusaX-MT has no labels: this is agreement, not accuracy).

Vectors are applied with the engine (``SparseVector.apply`` / ``revert`` on one classification model; a
language vector with ``heads=False``: its masked-LM head is no part of the encoder), which equals
``inference.composed_model(task, [lang], scales)`` up to float rounding (the tests check it). Everything runs
in eval mode under ``torch.inference_mode``, batched, truncated to ``--max-length`` tokens.

Writes ``PREFIX.json`` (every number) and ``PREFIX.md`` (tables) for ``--out PREFIX``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python benchmarks/research/lang_diagnostics.py` finds deftx_engine

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.common import write_outputs  # noqa: E402
from benchmarks.crosslingual import DEFAULT_DATA  # noqa: E402
from deftx_engine.method.vectors import SparseVector  # noqa: E402
from deftx_engine.models.e5_small import ALIAS as E5_ALIAS  # noqa: E402
from deftx_engine.models.loading import device, load_cls_model, load_tokenizer  # noqa: E402

VALID = Path("mt") / "valid.csv"


# ---- the math (pure) ------------------------------------------------------------------------------------------
def movement(a: Tensor, b: Tensor) -> float:
    """Mean cosine between matching rows of ``a`` and ``b`` ([N, H]): 1.0 when nothing moved."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def layer_movement(a: Tensor, b: Tensor) -> list[float]:
    """``movement`` per layer of [L, N, H] stacks."""
    return [movement(x, y) for x, y in zip(a, b)]


def cosine_matrix(targets: Tensor, sources: Tensor) -> Tensor:
    """[N, M] cosines between every target row and every source row."""
    return F.normalize(targets.double(), dim=-1) @ F.normalize(sources.double(), dim=-1).T


def retrieval_top1(targets: Tensor, sources: Tensor) -> float:
    """% of targets whose most similar source (by cosine) is their own translation (row i <-> row i)."""
    sim = cosine_matrix(targets, sources)
    return 100.0 * float((sim.argmax(dim=1) == torch.arange(len(sim))).double().mean())


def pair_margin(targets: Tensor, sources: Tensor) -> dict[str, float]:
    """Mean cosine of translation pairs (the diagonal), of non-pairs (off the diagonal), and pairs - non-pairs."""
    sim = cosine_matrix(targets, sources)
    n = len(sim)
    if n < 2 or sim.shape[1] != n:
        raise ValueError(f"pair_margin needs two or more parallel rows on each side, got {tuple(sim.shape)}")
    pair = float(sim.diagonal().mean())
    nonpair = float((sim.sum() - sim.diagonal().sum()) / (n * n - n))
    return {"pair_cos": pair, "nonpair_cos": nonpair, "margin": pair - nonpair}


def alignment(targets: Tensor, sources: Tensor) -> dict[str, float]:
    """Top-1 retrieval % target -> source and the pair margin, in one dict."""
    return {"top1": retrieval_top1(targets, sources), **pair_margin(targets, sources)}


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [..., N, T, H] over the positions where ``attention_mask`` [N, T] is 1."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(-2) / m.sum(-2).clamp(min=1)


# ---- data -----------------------------------------------------------------------------------------------------
@dataclass
class Parallel:
    """Parallel sentences: the source column whole, and per target the rows where both sides are non-empty."""

    source: list[str]
    targets: dict[str, list[str]]
    rows: dict[str, list[int]]  # indices into ``source`` of each target's sentences


def read_parallel(data: Path, source: str, targets: Sequence[str]) -> Parallel:
    """``<data>/mt/valid.csv``, checked: a missing file or column is an error naming it and what exists."""
    path = Path(data).expanduser() / VALID
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing (--data must be the NusaX folder holding mt/valid.csv, "
                         "NusaX-MT's valid split)")
    with path.open(encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    header = table[0] if table else []
    for lang in [source, *targets]:
        if lang not in header:
            raise SystemExit(f"error: {path} has no column {lang!r} (columns: {', '.join(c for c in header if c)})")
    col = {name: i for i, name in enumerate(header)}
    body = [r for r in table[1:] if len(r) == len(header)]
    src = [r[col[source]].strip() for r in body]
    out = Parallel(src, {}, {})
    for t in targets:
        keep = [i for i, r in enumerate(body) if src[i] and r[col[t]].strip()]
        if len(keep) < 2:
            raise SystemExit(f"error: {path}: fewer than 2 rows with both {source!r} and {t!r} text")
        out.rows[t] = keep
        out.targets[t] = [body[i][col[t]].strip() for i in keep]
    return out


# ---- encoding -------------------------------------------------------------------------------------------------
@dataclass
class Reps:
    """Representations of N sentences under one model state."""

    mean: Tensor  # [N, H] mean-pooled last hidden state
    first: Tensor  # [N, H] last hidden state at position 0 (CLS)
    head_input: Tensor  # [N, H] what the classification head reads (pooler output, else ``first``)
    layers: Tensor  # [L + 1, N, H] mean-pooled hidden state of every layer (0 = embeddings)
    labels: Tensor  # [N] predicted label ids (meaningful only with a task vector applied)

    def take(self, rows: Sequence[int]) -> Reps:
        idx = torch.tensor(list(rows), dtype=torch.long)
        return Reps(self.mean[idx], self.first[idx], self.head_input[idx], self.layers[:, idx], self.labels[idx])


def encode(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = 128) -> Reps:
    """One forward pass per batch of a classification model, every representation taken from it."""
    base = getattr(model, model.base_model_prefix)
    dev = next(model.parameters()).device
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: -len(enc["input_ids"][i]))  # little padding per batch
    seen: dict[str, object] = {}
    hook = base.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
    parts: list[tuple] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size]
                batch = tokenizer.pad({k: [enc[k][j] for j in rows] for k in enc.keys()},
                                      return_tensors="pt").to(dev)
                out = model(**batch, output_hidden_states=True)
                mask = batch["attention_mask"]
                layers = mean_pool(torch.stack(out.hidden_states).float(), mask)
                last = out.hidden_states[-1].float()
                pooled = getattr(seen.get("out"), "pooler_output", None)
                first = last[:, 0]
                parts.append((rows, layers[-1], first, first if pooled is None else pooled.float(), layers,
                              out.logits.argmax(-1)))
    finally:
        hook.remove()
    inv = torch.empty(len(texts), dtype=torch.long)
    inv[torch.tensor([j for p in parts for j in p[0]])] = torch.arange(len(texts))

    def cat(k: int, dim: int = 0) -> Tensor:
        return torch.cat([p[k].cpu() for p in parts], dim=dim).index_select(dim, inv)

    return Reps(cat(1), cat(2), cat(3), cat(4, dim=1), cat(5))


# ---- the measurements -----------------------------------------------------------------------------------------
@dataclass
class States:
    """Every encoding the report needs (targets keyed by language)."""

    base_src: Reps
    base_tgt: dict[str, Reps]
    lang_src: dict[str, Reps]  # source text under theta0 + phi_lang: the control
    lang_tgt: dict[str, Reps]
    task_src: Reps | None = None
    task_tgt: dict[str, Reps] | None = None
    comp_tgt: dict[str, Reps] | None = None


def encode_states(model: nn.Module, tokenizer, text: Parallel, task: SparseVector | None,
                  langs: dict[str, SparseVector], lang_scale: float = 1.0, batch_size: int = 32,
                  max_length: int = 128) -> States:
    """Encode under theta0, theta0 + phi_lang, and (with ``task``) theta0 + phi_task (+ phi_lang): the vectors are
    applied to ``model`` and reverted bit-exactly, so it is theta0 again at the end."""
    def enc(texts: Sequence[str]) -> Reps:
        return encode(model, tokenizer, texts, batch_size, max_length)

    def with_langs(src: bool) -> tuple[dict[str, Reps], dict[str, Reps]]:
        tgt, srcs = {}, {}
        for t, vec in langs.items():
            vec.apply(model, scale=lang_scale, heads=False)
            try:
                tgt[t] = enc(text.targets[t])
                if src:
                    srcs[t] = enc(text.source)
            finally:
                vec.revert(model)
        return tgt, srcs

    st = States(enc(text.source), {t: enc(text.targets[t]) for t in langs}, {}, {})
    st.lang_tgt, st.lang_src = with_langs(src=True)
    if task is not None:
        task.apply(model)
        try:
            st.task_src, st.task_tgt = enc(text.source), {t: enc(text.targets[t]) for t in langs}
            st.comp_tgt = with_langs(src=False)[0]
        finally:
            task.revert(model)
    return st


def label_counts(labels: Tensor, names: Sequence[str]) -> dict[str, int]:
    c = Counter(labels.tolist())
    return {n: int(c.get(i, 0)) for i, n in enumerate(names)}


def target_report(st: States, text: Parallel, target: str, label_names: Sequence[str]) -> dict:
    """Every number for one target (see the module docstring)."""
    rows = text.rows[target]
    base_src, base, lang = st.base_src.take(rows), st.base_tgt[target], st.lang_tgt[target]
    out = {"n": len(rows),
           "movement": {"mean_pooled": movement(base.mean, lang.mean),
                        "per_layer": layer_movement(base.layers, lang.layers),
                        "source_control": movement(st.base_src.mean, st.lang_src[target].mean)},
           "alignment": {"base": alignment(base.mean, base_src.mean), "lang": alignment(lang.mean, base_src.mean)}}
    if st.task_tgt is not None and st.comp_tgt is not None and st.task_src is not None:
        task_src, task, comp = st.task_src.take(rows), st.task_tgt[target], st.comp_tgt[target]
        out["alignment"]["task"] = alignment(task.mean, task_src.mean)
        out["alignment"]["composed"] = alignment(comp.mean, task_src.mean)
        out["classifier_input"] = {
            "head_input": movement(task.head_input, comp.head_input),
            "first_token": movement(task.first, comp.first),
            "mean_pooled": movement(task.mean, comp.mean),
            "per_layer": layer_movement(task.layers, comp.layers),
            "predictions_changed_pct": 100.0 * float((task.labels != comp.labels).double().mean()),
            "labels_task_only": label_counts(task.labels, label_names),
            "labels_composed": label_counts(comp.labels, label_names)}
    return out


# ---- output ---------------------------------------------------------------------------------------------------
def _f(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    """The tables of ``PREFIX.md``: the summary, details, and per-layer movement."""
    s, per = result["settings"], result["targets"]
    has_task = any("classifier_input" in r for r in per.values())
    lines = [f"# What the language vectors do to the representations ({s['model']})", "",
             f"{s['date']}; text: `{s['data_file']}` (held out from language-vector training), source "
             f"`{s['source']}`; language-vector scale {s['lang_scale']}; task vector `{s['task'] or '-'}`; "
             f"{result['wall_seconds']:.0f} s.", "",
             "| target | n | movement cos θ0→θ0+φ_lang | retrieval top-1 % (θ0 / θ0+φ_lang) "
             "| margin (θ0 / θ0+φ_lang) | classifier-input cos task-only→composed |",
             "|---|---:|---:|---:|---:|---:|"]
    for t, r in per.items():
        a, b = r["alignment"]["base"], r["alignment"]["lang"]
        ci = _f(r["classifier_input"]["head_input"], 4) if "classifier_input" in r else "-"
        lines.append(f"| {t} | {r['n']} | {_f(r['movement']['mean_pooled'], 4)} | {a['top1']:.1f} / {b['top1']:.1f} "
                     f"| {_f(a['margin'])} / {_f(b['margin'])} | {ci} |")
    lines += ["", "Movement: mean-pooled last layer. Retrieval and margin: target → source "
              "(mean-pooled; margin = mean cosine of translation pairs − of non-pairs), source always under θ0. "
              "Classifier input: what the classification head reads (BERT: the pooler output)."]
    if has_task:
        lines += ["", "| target | movement of source text (control) | top-1 % under task (θ0+φ_task / +φ_lang) "
                  "| margin under task (θ0+φ_task / +φ_lang) | head-input / CLS / mean cos task-only→composed "
                  "| predictions changed % | predicted labels task-only → composed |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for t, r in per.items():
            a, b, ci = r["alignment"]["task"], r["alignment"]["composed"], r["classifier_input"]
            labels = (" ".join(f"{v}" for v in ci["labels_task_only"].values()) + " → "
                      + " ".join(f"{v}" for v in ci["labels_composed"].values()))
            lines.append(f"| {t} | {_f(r['movement']['source_control'], 4)} | {a['top1']:.1f} / {b['top1']:.1f} "
                         f"| {_f(a['margin'])} / {_f(b['margin'])} | {_f(ci['head_input'], 4)} / "
                         f"{_f(ci['first_token'], 4)} / {_f(ci['mean_pooled'], 4)} "
                         f"| {ci['predictions_changed_pct']:.1f} | {labels} |")
        names = "/".join(next(iter(per.values()))["classifier_input"]["labels_task_only"])
        lines += ["", f"Under the task vector the source is under θ0+φ_task too. Label counts: {names}."]
    n_layers = len(next(iter(per.values()))["movement"]["per_layer"])
    lines += ["", "Per-layer movement (mean-pooled cosine; emb = embedding output, then layer 1…).", "",
              "| target | states | emb | " + " | ".join(str(i) for i in range(1, n_layers)) + " |",
              "|---|---|" + "---:|" * n_layers]
    for t, r in per.items():
        lines.append(f"| {t} | θ0→θ0+φ_lang | " + " | ".join(_f(x) for x in r["movement"]["per_layer"]) + " |")
        if "classifier_input" in r:
            lines.append(f"| {t} | task-only→composed | "
                         + " | ".join(_f(x) for x in r["classifier_input"]["per_layer"]) + " |")
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------------------
def parse_langs(items: Sequence[str], source: str) -> dict[str, Path]:
    """``TARGET=PATH`` options -> {target: folder}; each target once, never the source."""
    out: dict[str, Path] = {}
    for item in items:
        target, eq, path = item.partition("=")
        if not eq or not target or not path:
            raise SystemExit(f"error: --lang {item!r}: expected TARGET=PATH")
        if target == source or target in out:
            why = "the source language" if target == source else "given twice"
            raise SystemExit(f"error: --lang {target}: {why}")
        out[target] = Path(path).expanduser()
    if not out:
        raise SystemExit("error: give at least one --lang TARGET=PATH")
    return out


def load_kind(path: Path, kind: str) -> SparseVector:
    vec = SparseVector.load(path)
    if vec.meta.kind != kind:
        raise SystemExit(f"error: {path} is a {vec.meta.kind} vector, expected a {kind} vector")
    return vec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.research.lang_diagnostics",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=E5_ALIAS, help="base model (alias, folder or Hub id)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="NusaX folder (reads mt/valid.csv)")
    p.add_argument("--source", default="indonesian", help="source language (the task vector's)")
    p.add_argument("--task", help="task vector folder (without it: movement and alignment only)")
    p.add_argument("--lang", action="append", default=[], metavar="TARGET=PATH",
                   help="language vector folder of a target (repeat)")
    p.add_argument("--lang-scale", type=float, default=1.0, help="scale of every language vector")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens read per sentence")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.json and PREFIX.md")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    paths = parse_langs(args.lang, args.source)
    text = read_parallel(Path(args.data), args.source, list(paths))
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise SystemExit(f"error: --out {out}: the folder {out.parent} does not exist")
    task = load_kind(Path(args.task).expanduser(), "task") if args.task else None
    langs = {t: load_kind(p, "language") for t, p in paths.items()}
    label_names = task.meta.label_names if task else ["negative", "neutral", "positive"]
    torch.manual_seed(0)  # weights the checkpoint lacks (head, pooler) start the same every run
    model = load_cls_model(args.model, label_names).to(device()).eval()
    tokenizer = load_tokenizer(args.model)
    st = encode_states(model, tokenizer, text, task, langs, args.lang_scale, args.batch_size, args.max_length)
    result = {"settings": {"model": args.model, "data_file": str(Path(args.data).expanduser() / VALID),
                           "source": args.source, "task": args.task, "lang": {t: str(p) for t, p in paths.items()},
                           "lang_scale": args.lang_scale, "max_length": args.max_length,
                           "date": _dt.datetime.now().isoformat(timespec="seconds")},
              "targets": {t: target_report(st, text, t, label_names) for t in langs}}
    result["wall_seconds"] = time.perf_counter() - t0
    write_outputs(out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
