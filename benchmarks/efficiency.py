"""How close a training step comes to what this CPU can do, where the rest goes, the embedding fast path,
scoring throughput, and a whole SFT against what a user would do instead (a plain dense fine-tune).

Its job, against ``perf.py``: absolute speed on this machine's hardware -- achieved FLOP rate as a share of the
matmul rate, per precision (fp32, bf16) and with ``torch.compile``, and the wall time of what a user waits for on
the real models (scoring, the MLM-head fit, a whole SFT against the dense baseline). ``perf.py`` measures the
method's relative costs (sparse / full step, state per k, vector operations, memory) and how they scale with
model size; this module reuses its step harness (``perf.Phases``) rather than timing steps its own way.

Usage::

    python -m benchmarks.efficiency                          # MiniLM and multilingual-e5-small (~15 min, 2 cores)
    python -m benchmarks.efficiency --models tiny --repeats 2 --skip-whole   # seconds; what the test runs

1. **Matmul rate**: ``torch.mm`` in float32 on all threads at the shapes of the models' dense layers
   (tokens x hidden x 4 hidden); the median GFLOP/s is the machine's practical peak for this work.
2. **Step FLOP rate**: per model and kind, a full-phase step and a sparse-phase step (``perf.Phases``: what
   ``train_sft`` runs) on ``--batch`` x ``--seq`` tokens. FLOPs are counted analytically: forward = 2 x the
   encoder's weight-matrix entries x tokens + attention scores and mixing (4 x layers x batch x seq² x
   hidden); the MLM head on masked positions only (transform 2·H², decoder 2·H·V; the decoder is frozen, so
   its backward needs the input gradient only); backward = 2 x forward for trained matrices. Achieved
   GFLOP/s = FLOPs / median step time, reported as a share of the matmul rate; a ``torch.profiler`` table
   of one full step says where the rest goes (matmuls, optimizer, embedding backward, elementwise).
3. **Embedding fast path** (``deftx_engine/method/embedding_rows.py``): the full-phase step with the whole
   embedding matrix trained densely (the old path), with only the rows the batch uses trained (the engine's
   path), and with the embedding frozen; the goal is rows <= 1.3 x frozen.
4. **Scoring throughput**: sentences per second of ``evaluate.predict_proba`` (length-sorted batches,
   ``inference_mode``) against ``transformers.pipeline("text-classification")`` on the same model and
   sentences, in the same run (goal >= 2x).
5. **A whole SFT vs a dense fine-tune**: ``train_sft`` (both phases, denoise, mask, save) of a task SFT
   against ``baselines.dense_trainer`` (HF ``Trainer`` fine-tuning every parameter with the engine's phase-1
   settings) for the same total steps on the same data; the ratio
   and the share of the SFT's wall time spent outside training steps (goal <= 5 %).

Results: Markdown on stdout and ``--out`` (default ``benchmarks/out/efficiency/results.{md,json}``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from benchmarks.baselines import dense_trainer
from benchmarks.common import OtherCpu, machine_info, write_outputs
from benchmarks.perf import Phases, engine_mask, load, make_batches, model_source
from deftx_engine.constants import PRECISIONS
from deftx_engine.models.loading import resolve_model
from deftx_engine.models.precision import resolve as resolve_precision

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
NUSAX_TEST = ROOT.parent / "shared" / "data" / "nusax" / "sentiment" / "indonesian" / "test.csv"


def matmul_rate(hidden: int, tokens: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of ``torch.mm`` in ``dtype`` at a dense layer's shapes (tokens x H @ H x 4H and back)."""
    a, w1, w2 = (torch.randn(s, dtype=dtype) for s in ((tokens, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)))
    flops = 2 * tokens * hidden * 4 * hidden * 2
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        torch.mm(torch.mm(a, w1), w2)
        if i:  # the first call warms the allocator and the kernels up
            times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


def step_flops(model, kind: str, batch: dict, trained: str = "all") -> float:
    """Analytic FLOPs of one training step (forward + backward) on ``batch`` (see the module docstring)."""
    cfg = model.config
    b, t = batch["input_ids"].shape
    tokens, hidden, layers = b * t, cfg.hidden_size, cfg.num_hidden_layers
    prefix = model.base_model_prefix + "."
    matrices = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith(prefix) and p.ndim == 2 and "embeddings" not in n)
    forward = 2 * matrices * tokens + 4 * layers * b * t * t * hidden
    total = 3 * forward  # backward: gradients for inputs and weights, 2 x forward
    if kind == "language":
        masked = int((batch["labels"] != -100).sum())
        total += 3 * 2 * masked * hidden * hidden + 2 * 2 * masked * hidden * cfg.vocab_size
    return float(total)


@contextlib.contextmanager
def _embedding(ph: Phases, mode: str, batches: list[dict]):
    """``dense``: the whole matrix trains; ``rows``: the engine's fast path; ``frozen``: it does not train."""
    from deftx_engine.method.embedding_rows import train_rows_only

    emb = getattr(ph.model, ph.model.base_model_prefix).get_input_embeddings()
    if mode == "dense":
        yield
    elif mode == "frozen":
        name = next(n for n, p in ph.params.items() if p is emb.weight)
        was = ph.loaded_flags[name]
        ph.loaded_flags[name] = False
        try:
            yield
        finally:
            ph.loaded_flags[name] = was
    else:
        rows = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))
        with train_rows_only(emb, rows):
            ph.full_opt = None  # the optimizer must hold the row delta, not the matrix
            yield
        ph.full_opt = None


def profile_groups(ph: Phases, batch: dict) -> dict[str, float]:
    """Self CPU time of one full step by kind of work (share of the step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ph.full_step(batch)
    groups = {"matmul": ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm"), "optimizer": ("adam", "_foreach"),
              "embedding backward": ("embedding_dense_backward", "index_add", "embedding_backward"),
              "softmax / cross-entropy": ("softmax", "nll", "cross_entropy"),
              "attention kernel": ("scaled_dot_product", "_flash", "attention"),
              "dtype casts": ("copy_", "_to_copy"), "dropout": ("bernoulli", "dropout")}
    out = {g: 0.0 for g in groups} | {"other": 0.0}
    for ev in prof.key_averages():
        name = ev.key.lower()
        group = next((g for g, keys in groups.items() if any(k in name for k in keys)), "other")
        out[group] += ev.self_cpu_time_total
    total = sum(out.values()) or 1.0
    return {g: v / total for g, v in out.items()}


def matmul_rates(hiddens: set[int], tokens: int, repeats: int) -> dict[str, float]:
    """``{"fp32 H=384": GFLOP/s, "bf16 H=384": ...}``: the practical peak of each number format at each width."""
    return {f"{name} H={h}": statistics.median(matmul_rate(h, tokens, repeats, dtype) for _ in range(3))
            for h in sorted(hiddens) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def step_rates(source: str, kind: str, batch: int, seq: int, repeats: int, peaks: dict[str, float],
               precision: str, compiled: bool = False) -> list[dict]:
    """Step times of ``kind`` at ``precision``; float32 also with the embedding's other paths (section 3);
    ``compiled``: the engine's steps again with the model under ``torch.compile`` (inductor), and what the
    compilation costs (first step minus a compiled step)."""
    model = load(kind, source)
    amp = resolve_precision(precision)
    ph = Phases(model, kind, amp=amp)
    peak = peaks[f"{'bf16' if amp.dtype is torch.bfloat16 else 'fp32'} H={model.config.hidden_size}"]
    batches = make_batches(model, kind, repeats + 1, batch, seq)
    theta0 = {n: ph.params[n].detach().float().clone() for n in ph.roles.maskable}
    ph.full_step(batches[0])
    ph.set_mask(engine_mask(ph, theta0, kind))
    del theta0
    rows = []
    flops = step_flops(model, kind, batches[1])
    paths = (("full, embedding rows only (engine)", ph.full_step, "rows"),
             ("full, whole embedding (dense)", ph.full_step, "dense"),
             ("full, embedding frozen", ph.full_step, "frozen"),
             ("sparse (engine)", ph.sparse_step, "dense"))
    for label, step, mode in paths if amp.dtype is None else (paths[0], paths[3]):
        with _embedding(ph, mode, batches), OtherCpu() as other:
            step(batches[0])  # warm-up (and the optimizer's state)
            times = [step(b) for b in batches[1:]]
        med = statistics.median(times)
        rows.append({"kind": kind, "step": label, "precision": precision, "amp": amp.name, "median_s": med,
                     "gflops": flops / med / 1e9,
                     "share_of_matmul": flops / med / 1e9 / peak, "other_cores": other.cores})
    rows[0]["profile"] = profile_groups(ph, batches[1])
    if compiled:
        ph.model = torch.compile(model)
        for label, step, mode in (paths[0], paths[3]):
            with _embedding(ph, mode, batches), OtherCpu() as other:
                first = step(batches[0])  # compiles
                times = [step(b) for b in batches[1:]]
            med = statistics.median(times)
            rows.append({"kind": kind, "step": f"{label}, torch.compile", "precision": precision, "amp": amp.name,
                         "median_s": med, "gflops": flops / med / 1e9, "share_of_matmul": flops / med / 1e9 / peak,
                         "other_cores": other.cores, "compile_s": first - med})
    return rows


def scoring(source: str, repeats: int) -> dict:
    """Sentences per second: the engine's predict_proba (float32 and bf16) vs a plain float32
    text-classification pipeline, in one run."""
    from transformers import pipeline

    from deftx_engine.models.loading import load_cls_model, load_tokenizer
    from deftx_engine.outputs.inference import predict_proba
    from deftx_engine.training.data import load_task_data

    data = load_task_data(NUSAX_TEST if NUSAX_TEST.is_file() else EXAMPLES / "target_eval_id.csv")
    texts = data.texts
    model, tok = load_cls_model(source, data.label_names).eval(), load_tokenizer(source)
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    length = min(128, model.config.max_position_embeddings)
    ours, plain = {"fp32": [], "bf16": []}, []
    for _ in range(repeats):
        for precision, times in ours.items():
            t = time.perf_counter()
            predict_proba(model, tok, texts, max_length=length, precision=precision)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        pipe(texts, batch_size=32, truncation=True, max_length=length)
        plain.append(time.perf_counter() - t)
    n, base = len(texts), statistics.median(plain)
    return {"sentences": n, "pipeline_per_s": n / base,
            "engine": {p: {"per_s": n / statistics.median(t), "speedup": base / statistics.median(t)}
                       for p, t in ours.items()}}


def head_fit(source: str, precision: str) -> dict:
    """The one-time MLM-head fit of the README's CLI block (the demo corpus, the trainer's settings), uncached:
    what the first language SFT on a new base model and text waits for."""
    from deftx_engine.models.loading import load_mlm_model, load_tokenizer
    from deftx_engine.models.mlm_head import HeadFitConfig, fit_head, split_heldout
    from deftx_engine.training.data import load_corpus

    model, tok = load_mlm_model(source), load_tokenizer(source)
    train, heldout = split_heldout(load_corpus(EXAMPLES / "target_corpus_id.txt"), 0.1)
    t = time.perf_counter()
    record = fit_head(model, tok, train, heldout, HeadFitConfig(max_length=64), amp=resolve_precision(precision))
    return {"precision": precision, "seconds": time.perf_counter() - t, "steps": record["steps"],
            "heldout_loss": record["heldout"]["loss"], "heldout_top1": record["heldout"]["accuracy"]}


def whole_sft(source: str, steps: int) -> dict:
    """A task SFT through ``train_sft`` vs the dense baseline (``baselines.dense_trainer``: HF Trainer fine-tuning
    everything) for the same total steps."""
    from deftx_engine.training.config import TrainConfig
    from deftx_engine.training.runs import RunDir
    from deftx_engine.training.train import train_sft

    data = str(EXAMPLES / "source_task_en.csv")
    cfg = TrainConfig(kind="task", data=data, base_model=source, full_steps=steps, sparse_steps=steps, lr=2e-4,
                      batch_size=16, max_length=64, save_steps=10 ** 6, logging_steps=1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train_sft(cfg, RunDir(Path(tmp) / "sft"))
        sft = time.perf_counter() - t
        logged = [json.loads(line) for line in (Path(tmp) / "sft" / "metrics.jsonl").read_text().splitlines()]
        trainer = dense_trainer(cfg, Path(tmp) / "dense", 2 * steps)
        t = time.perf_counter()
        trainer.train()
        dense = time.perf_counter() - t
    times = [m["time"] for m in logged if m.get("phase") in ("full", "sparse")]
    in_steps = sum(b - a for a, b in zip(times, times[1:]))  # between the first and the last logged step
    return {"steps": 2 * steps, "precision": resolve_precision(cfg.precision).name,  # auto, both sides
            "sft_s": sft, "dense_trainer_s": dense, "ratio": sft / dense,
            "outside_steps_share": max(0.0, 1 - in_steps / sft)}


def markdown(res: dict) -> str:
    rates = ", ".join(f"{k} {v:.0f}" for k, v in res["matmul_gflops"].items())
    lines = [f"Machine: {res['machine']}; precision auto: {res['auto']}; bf16: {res['bf16']}.",
             f"Matmul rate, GFLOP/s (torch.mm, all threads, tokens x H x 4H and back): {rates}.", "",
             "| model | kind | step | precision | median s | GFLOP/s | share of its matmul rate | other cores |",
             "|---" * 8 + "|"]
    for m, rows in res["steps"].items():
        for r in rows:
            other = "n/a" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
            compiled = f" (compiling: {r['compile_s']:.0f} s)" if "compile_s" in r else ""
            lines.append(f"| {m} | {r['kind']} | {r['step']}{compiled} | {r['precision']} ({r['amp']}) | "
                         f"{r['median_s']:.3f} | {r['gflops']:.1f} | {r['share_of_matmul']:.0%} | {other} |")
    profiled = [(m, r) for m, rows in res["steps"].items() for r in rows if "profile" in r]
    if profiled:
        groups = list(profiled[0][1]["profile"])
        lines += ["", "Where a full step's time goes (share of self CPU time, one profiled step):", "",
                  "| model | kind | precision | " + " | ".join(groups) + " |", "|---" * (3 + len(groups)) + "|"]
        lines += [f"| {m} | {r['kind']} | {r['amp']} | " + " | ".join(f"{r['profile'][g]:.0%}" for g in groups) + " |"
                  for m, r in profiled]
    for m, s in res.get("scoring", {}).items():
        lines.append(f"\nScoring ({m}, {s['sentences']} sentences): float32 pipeline {s['pipeline_per_s']:.1f}/s; "
                     + "; ".join(f"engine {p} {e['per_s']:.1f}/s ({e['speedup']:.2f}x)"
                                 for p, e in s["engine"].items()))
    for m, fits in res.get("head_fit", {}).items():
        lines.append(f"\nMLM-head fit ({m}, demo corpus): " + "; ".join(
            f"{f['precision']} {f['seconds']:.1f} s ({f['steps']} steps, held-out loss {f['heldout_loss']:.3f}, "
            f"top-1 {f['heldout_top1']:.1%})" for f in fits))
    for m, w in res.get("whole", {}).items():
        lines.append(f"\nWhole task SFT ({m}, {w['steps']} steps, {w['precision']}): {w['sft_s']:.1f} s vs dense "
                     f"Trainer {w['dense_trainer_s']:.1f} s ({w['ratio']:.2f}x); outside training steps "
                     f"{w['outside_steps_share']:.1%} of the SFT")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "multilingual-e5-small"],
                   help="minilm, multilingual-e5-small, tiny (random 2-layer BERT) or a model folder")
    p.add_argument("--kinds", nargs="+", default=["language", "task"], help="language and/or task steps")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS,
                   help="precisions to time the steps in (TrainConfig.precision)")
    p.add_argument("--compile", action="store_true",
                   help="also time the engine's steps under torch.compile (at each precision but fp32), with "
                        "the compilation time")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per example")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (and scoring runs) per measurement")
    p.add_argument("--whole-steps", type=int, default=20, help="steps per phase of the whole-SFT comparison")
    p.add_argument("--skip-whole", action="store_true", help="skip the scoring, head-fit and whole-SFT comparisons")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "efficiency" / "results"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {m: model_source(m, Path(tmp)) if m == "tiny" else m for m in args.models}
        hiddens = {AutoConfig.from_pretrained(resolve_model(src)).hidden_size for src in sources.values()}
        res = {"machine": machine_info("torch", "transformers"), "settings": vars(args),
               "auto": resolve_precision("auto").why, "bf16": resolve_precision("bf16").why,
               "matmul_gflops": matmul_rates(hiddens, args.batch * args.seq, args.repeats), "steps": {},
               "scoring": {}, "head_fit": {}, "whole": {}}
        for m, src in sources.items():
            res["steps"][m] = [r for kind in args.kinds for precision in args.precisions
                               for r in step_rates(src, kind, args.batch, args.seq, args.repeats,
                                                   res["matmul_gflops"], precision,
                                                   compiled=args.compile and precision != "fp32")]
            if not args.skip_whole:
                res["scoring"][m] = scoring(src, args.repeats)
                res["head_fit"][m] = [head_fit(src, precision) for precision in args.precisions]
                res["whole"][m] = whole_sft(src, args.whole_steps)
    write_outputs(Path(args.out), res, markdown(res))
    return res


if __name__ == "__main__":
    main()
