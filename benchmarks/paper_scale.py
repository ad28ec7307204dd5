"""Paper-scale figures on a GPU: an xlm-roberta-base-shaped model (built from its configuration, no
download) at the paper's batch and length, both phases, k = 14,155,776 (task) / 7,667,712 (language).

Usage (one GPU, ~5 minutes)::

    python -m benchmarks.paper_scale                         # xlm-roberta-base shapes on cuda, bf16
    python -m benchmarks.paper_scale --size tiny --device cpu --steps 2   # seconds; what the test runs

Per kind (task: batch 32 x 128 tokens; language: batch 8 x 256, 15 % masked) it measures the median time of a
full-phase step (AdamW over every trained parameter, gradient clipping) and of a sparse-phase step
(``SparseAdamW`` over the k masked entries), both under bf16 autocast where supported, the peak GPU memory,
the time of denoise + global top-k of the phase-1 delta on the device, and ``SparseVector`` apply / revert.
From the step times it projects the wall time of ``--preset paper-xlmr-base`` (language: 100k + 100k steps;
task: 5 + 5 epochs of NusaX's 500 training sentences -- pass ``--task-examples`` for another data set).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info
from benchmarks.perf import Phases, load, make_batches, model_source
from deftx_engine.fileio import write_json_atomic
from deftx_engine.method.denoise import choose_mask
from deftx_engine.method.denoise_config import DenoiseConfig
from deftx_engine.method.vectors import SparseVector, VectorMeta, base_fingerprint
from deftx_engine.models.presets import preset

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"task": (32, 128), "language": (8, 256)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(source: str, kind: str, device: str, steps: int, k: int) -> dict:
    model = load(kind, source).to(device)
    ph = Phases(model, kind)
    batch, seq = SHAPES[kind]
    seq = min(seq, model.config.max_position_embeddings - 2)  # the tiny test model is shorter
    batches = [{n: t.to(device) for n, t in b.items()} for b in make_batches(model, kind, steps + 1, batch, seq)]
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
    theta0 = {n: ph.params[n].detach().clone() for n in ph.roles.maskable}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def timed(step) -> list[float]:
        out = []
        for b in batches:
            _sync(device)
            t = time.perf_counter()
            with autocast:
                step(b)
            _sync(device)
            out.append(time.perf_counter() - t)
        return out[1:]  # the first step warms up kernels and optimizer state

    full = timed(ph.full_step)
    _sync(device)
    t = time.perf_counter()
    deltas = {n: ph.params[n].detach().float() - theta0[n].float() for n in ph.roles.maskable}
    mask, _ = choose_mask(deltas, min(k, sum(d.numel() for d in deltas.values())), DenoiseConfig())
    _sync(device)
    denoise_s = time.perf_counter() - t
    del deltas
    meta = VectorMeta(kind=kind, base_model=source, base_fingerprint=base_fingerprint(model))
    vec = SparseVector.from_diff(meta, theta0, model, mask, [])
    ph.set_mask(mask)
    sparse = timed(ph.sparse_step)
    _sync(device)
    t = time.perf_counter()
    vec.apply(model)
    _sync(device)
    apply_s, t = time.perf_counter() - t, time.perf_counter()
    vec.revert(model)
    _sync(device)
    return {"kind": kind, "batch": batch, "seq": seq, "bf16": bf16, "k": vec.nnz,
            "full_step_s": statistics.median(full), "sparse_step_s": statistics.median(sparse),
            "denoise_topk_s": denoise_s, "apply_s": apply_s, "revert_s": time.perf_counter() - t,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}


def projection(rows: dict, task_examples: int) -> dict:
    """Hours of ``--preset paper-xlmr-base`` from the measured step times (steps only)."""
    out = {}
    if "language" in rows:
        p, r = preset("paper-xlmr-base", "language"), rows["language"]
        out["language_hours"] = (p["full_steps"] * r["full_step_s"] + p["sparse_steps"] * r["sparse_step_s"]) / 3600
    if "task" in rows:
        p, r = preset("paper-xlmr-base", "task"), rows["task"]
        per_epoch = math.ceil(task_examples / p["batch_size"])
        steps = per_epoch * p["full_epochs"], per_epoch * p["sparse_epochs"]
        out["task_hours"] = (steps[0] * r["full_step_s"] + steps[1] * r["sparse_step_s"]) / 3600
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="xlmr-base", help="xlmr-base (published shapes, random weights) or tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kinds", nargs="+", default=["task", "language"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase (after one warm-up step)")
    p.add_argument("--task-examples", type=int, default=500, help="training sentences of the task (NusaX: 500)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "paper_scale" / "results.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = model_source(args.size, Path(tmp))
        rows = {kind: measure(source, kind, args.device, args.steps,
                              preset("paper-xlmr-base", kind)["k"]) for kind in args.kinds}
    res = {"machine": machine_info("torch"), "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "settings": vars(args), "rows": rows, "projection": projection(rows, args.task_examples)}
    write_json_atomic(args.out, res, default=str)
    print(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
