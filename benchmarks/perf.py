"""Training and scaling benchmark: what sparse fine-tuning costs *relative to* dense training, and how that grows
with model size -- step time of the two phases, optimizer state, vector operations, memory.

Its job, against ``efficiency.py``: here every figure is a ratio or a scaling law of the method (sparse step /
full step, state bytes per k, time and bytes per vector entry, peak memory) over model sizes, in float32;
``efficiency.py`` asks how close the engine comes to this CPU's hardware (FLOP rate against the matmul rate,
precisions, compile) and what a user waits for on the real models (scoring, the head fit, a whole SFT).

Usage::

    python -m benchmarks.perf                         # tiny, MiniLM and xlm-roberta-base shapes (~15 min, 2 cores)
    python -m benchmarks.perf --sizes minilm          # MiniLM only
    python -m benchmarks.perf --sizes tiny --repeats 2 --rss-model tiny   # seconds; what the test runs

Per model size (``tiny``: a 2-layer hidden-16 BERT; ``minilm``: the bundled all-MiniLM-L6-v2;
``xlmr-base``: ``XLMRobertaConfig`` with xlm-roberta-base's published sizes, random weights built in
process, no download) it measures:

1. **Step time, full phase vs sparse phase, on the same batches.** One model, loaded with the engine's
   ``load_mlm_model`` / ``load_cls_model``; a full-phase step is what phase 1 of ``train_sft`` runs
   (forward, backward, ``clip_grad_norm_(1.0)``, the optimizer HF ``Trainer.create_optimizer`` builds from
   the engine's ``train.training_arguments`` -- fused AdamW on CPU --, ``zero_grad``); a sparse-phase step is
   phase 2 (parameters set up by ``params.trainable_setup`` with a real mask, ``optim.SparseAdamW`` built as
   ``train_sft`` builds it, no Trainer-side clipping). The mask is the engine's: the delta of the warm-up full steps,
   denoised (energy 0.90, rho 0.05) and cut to the global top-k (2.8 % language, 5.2 % task). Full and
   sparse steps are *interleaved* on the same batch, so machine load hits both alike; the table gives the
   median of ``--repeats`` timed steps after ``--warmup`` warm-up steps, the ratio of medians and the
   median of the per-batch ratios (target <= 1.10), and the same over the *quiet* pairs only (other processes
   used < 0.2 cores during the pair, from /proc/stat); the target is judged on the quiet pairs when there
   are at least 3. Batches: ``--batch`` x ``--seq`` random token ids
   (15 % masked for MLM), no padding, so the cost depends on the model only.
2. **Optimizer state bytes**: dense AdamW after one step vs ``SparseAdamW.state_bytes()`` at two k (it must be
   proportional to k: bytes / k is printed).
3. **Apply / revert / compose time and vector file size vs k**: random vectors of k entries on the real
   parameter shapes (indices by the engine's ``select_top_k`` over random scores).
4. **Denoise + mask time** of a full model delta (random Gaussian deltas of the real shapes, worst case
   for the energy rank) -- per size.
5. **Peak RSS of a whole language SFT run**: ``python -m deftx_engine.cli train-language --preset cpu-demo``
   on ``assets/examples/target_corpus_id.txt`` as a subprocess; max RSS from ``getrusage(RUSAGE_CHILDREN)``
   read by a small wrapper interpreter (a child forked from this process would count its pages).

If the sparse/full ratio exceeds 1.10 on any size, run with ``--profile`` to get a ``torch.profiler`` table
of both steps (top operators by self CPU time).

Results: Markdown tables on stdout and in ``--out`` (default ``benchmarks/out/perf/results.{md,json}``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import OtherCpu, machine_info, prefixed, wait_quiet, write_outputs  # noqa: E402
from benchmarks.core import make_deltas  # noqa: E402
from deftx_engine.constants import DEFAULT_K, KINDS  # noqa: E402
from deftx_engine.fileio import atomic_dir  # noqa: E402
from deftx_engine.method.denoise import DenoiseConfig, choose_mask  # noqa: E402
from deftx_engine.method.masks import k_from, select_top_k  # noqa: E402
from deftx_engine.method.optim import SparseAdamW  # noqa: E402
from deftx_engine.method.params import parameter_roles, trainable_setup  # noqa: E402
from deftx_engine.method.vectors import SparseVector, VectorMeta, base_fingerprint, compose  # noqa: E402
from deftx_engine.models.loading import load_cls_model, load_mlm_model  # noqa: E402
from deftx_engine.models.precision import Amp  # noqa: E402
from deftx_engine.models.precision import resolve as resolve_precision  # noqa: E402
from deftx_engine.training.config import TrainConfig  # noqa: E402
from deftx_engine.training.train import training_arguments  # noqa: E402

SIZES = ("tiny", "minilm", "xlmr-base")
LABELS = ["negative", "neutral", "positive"]
TARGET_RATIO = 1.10
QUIET_CORES = 0.2  # a full/sparse pair counts as quiet when other processes used less than this many cores


# ---- models ---------------------------------------------------------------------------------------------------
def model_source(size: str, tmp: Path) -> str:
    """Something the engine loaders accept: the alias, or a random-weight model saved to ``tmp``."""
    if size == "minilm":
        return "minilm"
    folder = tmp / size
    if (folder / "config.json").exists():
        return str(folder)
    if size == "tiny":
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64))
    elif size == "xlmr-base":
        from transformers import XLMRobertaConfig, XLMRobertaModel

        # the class defaults are BERT-sized; these are xlm-roberta-base's published values
        cfg = XLMRobertaConfig(vocab_size=250_002, max_position_embeddings=514, type_vocab_size=1,
                               layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        torch.manual_seed(0)
        model = XLMRobertaModel(cfg)
    else:
        raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    with atomic_dir(folder, "config.json") as tmp_folder:  # config.json above means a whole model
        model.save_pretrained(tmp_folder)
    return str(folder)


def load(kind: str, source: str):
    return load_mlm_model(source) if kind == "language" else load_cls_model(source, LABELS)


def make_batches(model, kind: str, n: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    """``n`` batches of random token ids (no padding); MLM: 15 % of the positions masked and scored."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (batch, seq), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind == "language":
            picked = torch.rand(batch, seq, generator=g) < 0.15
            picked[:, 1] = True
            b["labels"] = torch.where(picked, ids, torch.full_like(ids, -100))
            b["input_ids"] = torch.where(picked, torch.full_like(ids, 4), ids)
        else:
            b["labels"] = torch.randint(0, len(LABELS), (batch,), generator=g)
        out.append(b)
    return out


def _loss(out):
    return out["loss"] if isinstance(out, dict) else out.loss


def dense_optimizer(model, kind: str, lr: float = 5e-5):
    """The optimizer of a run's phase 1: what HF Trainer builds from the engine's phase-1 arguments."""
    from transformers import Trainer

    out = Path(tempfile.mkdtemp(prefix="perf-trainer-"))
    args = training_arguments(TrainConfig(kind=kind, data="(perf: random batches)", lr=lr), out, 1,
                              resolve_precision("fp32"), checkpoints=False)
    opt = Trainer(model=model, args=args).create_optimizer()
    shutil.rmtree(out, ignore_errors=True)
    return opt


class Phases:
    """One model that can take a phase-1 (full) or a phase-2 (sparse) step, as ``train_sft`` sets them up."""

    def __init__(self, model, kind: str, mask: dict | None = None, amp: Amp | None = None):
        self.model, self.kind = model, kind
        self.amp = amp or resolve_precision("fp32")  # forward passes under its autocast, as Trainer runs them
        self.roles = parameter_roles(model)
        self.params = dict(model.named_parameters())
        self.loaded_flags = {n: p.requires_grad for n, p in self.params.items()}  # e.g. the frozen MLM decoder
        self.full_opt = None
        self.sparse_opt = None
        self.mask = mask

    def _full_setup(self):
        for n, p in self.params.items():
            p.requires_grad_(self.loaded_flags[n])
        trainable_setup(self.model, self.roles, None)

    def _sparse_setup(self):
        self._full_setup()
        trainable_setup(self.model, self.roles, self.mask)

    def set_mask(self, mask: dict) -> None:
        self.mask = mask
        self._sparse_setup()
        heads = [n for n in self.roles.heads if self.params[n].requires_grad]
        self.sparse_opt = SparseAdamW([(self.params[n], mask[n]) for n in self.roles.maskable
                                       if self.params[n].requires_grad] +
                                      [(self.params[n], None) for n in heads], lr=5e-5, weight_decay=0.0)

    def full_step(self, batch) -> float:
        self._full_setup()
        if self.full_opt is None:
            self.full_opt = dense_optimizer(self.model, self.kind)
        self.model.train()
        t = time.perf_counter()
        with self.amp.autocast():
            loss = _loss(self.model(**batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.full_opt.step()
        self.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def sparse_step(self, batch) -> float:
        self._sparse_setup()
        self.model.train()
        t = time.perf_counter()
        with self.amp.autocast():
            loss = _loss(self.model(**batch))
        loss.backward()
        self.sparse_opt.step()  # Trainer passes max_grad_norm=0 in phase 2: the optimizer clips itself
        self.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t


def engine_mask(ph: Phases, theta0: dict, kind: str) -> dict:
    """The mask train_sft would choose from the current delta: deftx denoise + global top-k."""
    deltas = {n: ph.params[n].detach().float() - theta0[n] for n in ph.roles.maskable}
    return choose_mask(deltas, DEFAULT_K[kind], DenoiseConfig())[0]


def step_times(source: str, kind: str, batch: int, seq: int, repeats: int, warmup: int, profile: bool,
               quiet_wait: float = 0.0) -> dict:
    """Interleaved full / sparse steps on the same batches; medians, ratios, optimizer bytes."""
    model = load(kind, source)
    ph = Phases(model, kind)
    batches = make_batches(model, kind, warmup + repeats, batch, seq)
    theta0 = {n: ph.params[n].detach().float().clone() for n in ph.roles.maskable}
    for b in batches[:warmup]:  # warm-up full steps also give the delta the mask is chosen from
        ph.full_step(b)
    mask = engine_mask(ph, theta0, kind)
    del theta0
    ph.set_mask(mask)
    for b in batches[:warmup]:
        ph.sparse_step(b)
    wait_quiet(quiet_wait, f"timing {kind} steps")
    full, sparse, others = [], [], []
    with OtherCpu() as other:
        for b in batches[warmup:]:
            with OtherCpu() as pair:
                full.append(ph.full_step(b))
                sparse.append(ph.sparse_step(b))
            others.append(pair.cores)
    quiet = [i for i, c in enumerate(others) if c is not None and c < QUIET_CORES]
    res = {"kind": kind, "batch": batch, "seq": seq, "repeats": repeats,
           "full_median_s": statistics.median(full), "sparse_median_s": statistics.median(sparse),
           "full_s": full, "sparse_s": sparse, "other_cores_per_pair": others, "quiet_pairs": len(quiet),
           "quiet_median_pair_ratio": statistics.median(sparse[i] / full[i] for i in quiet) if quiet else None,
           "quiet_full_median_s": statistics.median(full[i] for i in quiet) if quiet else None,
           "quiet_sparse_median_s": statistics.median(sparse[i] for i in quiet) if quiet else None,
           "ratio_of_medians": statistics.median(sparse) / statistics.median(full),
           "median_pair_ratio": statistics.median(s / f for s, f in zip(sparse, full)),
           "k": sum(int(i.numel()) for i in mask.values()),
           "maskable": sum(ph.params[n].numel() for n in ph.roles.maskable),
           "params_with_grad_sparse": sum(1 for n in ph.roles.maskable if mask[n].numel() > 0),
           "params_maskable": len(ph.roles.maskable), "other_cores": other.cores}
    res["dense_adamw_state_bytes"] = _dense_state_bytes(ph.full_opt)
    res["sparse_adamw_state_bytes"] = ph.sparse_opt.state_bytes()
    if profile:
        res["profile"] = {"full": _profile(ph.full_step, batches[-1]), "sparse": _profile(ph.sparse_step, batches[-1])}
    del ph, model
    gc.collect()
    return res


def _dense_state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def _profile(step, batch) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def optimizer_state_vs_k(source: str, kind: str, shares: list[float]) -> list[dict]:
    """SparseAdamW state bytes after one step for each k (random gradients; heads dense)."""
    model = load(kind, source)
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    out = []
    for share in shares:
        scores = make_deltas({n: params[n].shape for n in roles.maskable}, 1, noise_share=1.0)
        k = k_from(share, sum(t.numel() for t in scores.values()))
        mask = select_top_k(scores, k)
        del scores
        heads = [n for n in roles.heads if params[n].requires_grad]
        opt = SparseAdamW([(params[n], mask[n]) for n in roles.maskable if mask[n].numel()] +
                          [(params[n], None) for n in heads], lr=1e-6)
        for n in [*roles.maskable, *heads]:
            params[n].grad = torch.zeros_like(params[n]) if (n in heads or mask[n].numel()) else None
        opt.step()
        head_bytes = 2 * 4 * sum(params[n].numel() for n in heads)
        total = opt.state_bytes()
        out.append({"share": share, "k": k, "state_bytes": total, "head_state_bytes": head_bytes,
                    "masked_state_bytes_per_k": (total - head_bytes) / k})
        model.zero_grad(set_to_none=True)
        del opt
    return out


# ---- vectors ----------------------------------------------------------------------------------------------------
def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def random_vector(model, kind: str, share: float, seed: int) -> SparseVector:
    """The largest ``share`` of a Gaussian delta of ``model``'s maskable shapes, as a vector (task: with heads)."""
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    scores = make_deltas({n: params[n].shape for n in roles.maskable}, seed, noise_share=1.0)
    mask = select_top_k(scores, k_from(share, sum(t.numel() for t in scores.values())))
    vec = SparseVector(VectorMeta(kind=kind, base_model="perf", base_fingerprint=base_fingerprint(model),
                                  label_names=LABELS if kind == "task" else []))
    for n, idx in mask.items():
        if idx.numel():
            vec.indices[n] = idx.to(torch.int32)
            vec.values[n] = scores[n].reshape(-1)[idx]
            vec.shapes[n] = tuple(params[n].shape)
    if kind == "task":
        for n in roles.heads:
            vec.heads[n] = params[n].detach().clone()
            vec.shapes[n] = tuple(params[n].shape)
    vec.meta.k = vec.nnz
    return vec


def vector_ops(source: str, shares: list[float], repeats: int, tmp: Path) -> list[dict]:
    """apply / revert / compose / save / load times and the file size, per k (task vector + a 2.8 % one)."""
    model = load_cls_model(source, LABELS)
    lang = random_vector(model, "language", DEFAULT_K["language"], seed=99)
    rows = []
    for share in shares:
        vec = random_vector(model, "task", share, seed=1)

        def apply_revert():
            t = time.perf_counter()
            vec.apply(model)
            t_apply = time.perf_counter() - t
            vec.revert(model)
            return t_apply, time.perf_counter() - t - t_apply

        pairs = [apply_revert() for _ in range(repeats)]
        t_compose, composed = _timed(lambda: compose([vec, lang]), repeats)
        folder = tmp / f"vec-{share}"
        t_save, _ = _timed(lambda: vec.save(folder), repeats)
        t_load, _ = _timed(lambda: SparseVector.load(folder), repeats)
        size = sum(f.stat().st_size for f in folder.iterdir())
        head_bytes = sum(t.numel() * 4 for t in vec.heads.values())
        rows.append({"share": share, "k": vec.nnz, "apply_s": statistics.median(p[0] for p in pairs),
                     "revert_s": statistics.median(p[1] for p in pairs), "compose_with_language_s": t_compose,
                     "composed_nnz": composed.nnz, "save_s": t_save, "load_s": t_load, "file_bytes": size,
                     "head_bytes": head_bytes, "bytes_per_entry": (size - head_bytes) / vec.nnz})
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def denoise_mask_time(source: str, repeats: int) -> dict:
    """Denoise (energy 0.90, rho 0.05, in place) + global top-k (task share) of a random full-model delta."""
    model = load_cls_model(source, LABELS)
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    shapes = {n: params[n].shape for n in roles.maskable}
    del model, params
    times = []
    for r in range(repeats):
        deltas = make_deltas(shapes, r, noise_share=1.0)
        split = {}
        choose_mask(deltas, DEFAULT_K["task"], DenoiseConfig(), times=split)
        times.append((split["denoise"], split["top_k"]))
        del deltas
    return {"denoise_s": statistics.median(t[0] for t in times), "top_k_s": statistics.median(t[1] for t in times)}


# ---- a whole language SFT run -----------------------------------------------------------------------------------
_RSS_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r)")


def language_sft_rss(model: str, extra: list[str]) -> dict:
    """Run ``deftx train-language --preset cpu-demo`` as a child process; its max RSS and wall time.

    The run is started by a small wrapper interpreter that reads ``getrusage(RUSAGE_CHILDREN).ru_maxrss``
    when it ends: a child forked straight from this (large) benchmark process would start with this
    process's resident pages counted in its maximum.
    """
    out = Path(tempfile.mkdtemp(prefix="perf-lang-sft-"))
    cmd = [sys.executable, "-m", "deftx_engine.cli", "train-language", "--preset", "cpu-demo", "--data",
           str(ROOT / "assets" / "examples" / "target_corpus_id.txt"), "--language", "id",
           "--base-model", model, "--output-dir", str(out / "run"), *extra]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    log = (out / "run" / "log.txt").read_text(encoding="utf-8") if (out / "run" / "log.txt").exists() else ""
    phases = phase_step_times(out / "run" / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])  # Linux: kilobytes
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "max_rss_bytes": peak_kb * 1024, "log": log,
            "phase_step_s": phases}


def phase_step_times(metrics: Path) -> dict[str, float]:
    """Seconds per step of each phase in a real run, from its metrics log: the median over consecutive loss
    records of (time between them) / (steps between them) -- the Trainer's own loop, as users run it."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()] if metrics.exists() else []
    out = {}
    for phase in ("full", "sparse"):
        r = [x for x in rows if x.get("phase") == phase and "step" in x]
        gaps = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(r, r[1:]) if b["step"] > a["step"]]
        if gaps:
            out[phase] = statistics.median(gaps)
    return out


# ---- report -----------------------------------------------------------------------------------------------------
def _cores(c) -> str:
    return "n/a" if c is None else f"{c:.2f}"


def _mb(b: float) -> str:
    return f"{b / 2 ** 20:,.1f} MiB"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def markdown(res: dict) -> str:
    m = res["machine"]
    L = [f"Date {res['date']}; {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']}, {m['torch threads']} threads; "
         f"load average at start {m['load average (1/5/15 min) at start'].split(' / ')[0]}.", ""]
    steps = [(size, s) for size, r in res["sizes"].items() for s in r.get("steps", [])]
    rows = []
    for size, s in steps:
        best = s["quiet_median_pair_ratio"] if s.get("quiet_pairs", 0) >= 3 else s["median_pair_ratio"]
        q = (f"{s['quiet_pairs']}: {s['quiet_full_median_s'] * 1e3:.0f} ms / {s['quiet_sparse_median_s'] * 1e3:.0f} "
             f"ms / {s['quiet_median_pair_ratio']:.2f}") if s.get("quiet_pairs") else "0"
        rows.append([size, s["kind"], f"{s['batch']} × {s['seq']}", f"{s['k']:,} ({s['k'] / s['maskable']:.1%})",
                     f"{s['full_median_s'] * 1e3:.0f} ms", f"{s['sparse_median_s'] * 1e3:.0f} ms",
                     f"{s['ratio_of_medians']:.2f}", f"{s['median_pair_ratio']:.2f}", q,
                     "yes" if best <= TARGET_RATIO else "**no**", _cores(s.get("other_cores"))])
    L += ["### Step time: full phase vs sparse phase (same batches, interleaved)", "",
          *_table(["size", "kind", "batch × seq", "k (share)", "full median", "sparse median",
                   "sparse / full (medians)", "median per-batch ratio", "quiet pairs: full / sparse / median ratio",
                   "target ≤ 1.10", "other processes (cores)"], rows)]
    L += ["", "### Optimizer state", "",
          *_table(["size", "kind", "dense AdamW (phase 1)", "SparseAdamW (phase 2, same k)", "sparse / dense"],
                  [[size, s["kind"], _mb(s["dense_adamw_state_bytes"]), _mb(s["sparse_adamw_state_bytes"]),
                    f"{s['sparse_adamw_state_bytes'] / s['dense_adamw_state_bytes']:.3f}"] for size, s in steps])]
    L += ["", *_table(["size", "kind", "k", "SparseAdamW state", "of which dense heads", "(state − heads) / k"],
                      [[size, o["kind"], f"{o['k']:,} ({o['share']:.1%})", f"{o['state_bytes']:,} B",
                        f"{o['head_state_bytes']:,} B", f"{o['masked_state_bytes_per_k']:.2f} B"]
                       for size, r in res["sizes"].items() for o in r.get("optimizer_vs_k", [])])]
    L += ["", "### Sparse vectors: apply / revert / compose / save / load, file size vs k", "",
          *_table(["size", "k (share)", "apply", "revert", "compose with a 2.8 % vector", "save", "load", "file",
                   "bytes / entry (heads excluded)"],
                  [[size, f"{v['k']:,} ({v['share']:.1%})", f"{v['apply_s'] * 1e3:.1f} ms",
                    f"{v['revert_s'] * 1e3:.1f} ms", f"{v['compose_with_language_s'] * 1e3:.1f} ms",
                    f"{v['save_s'] * 1e3:.0f} ms", f"{v['load_s'] * 1e3:.0f} ms", _mb(v["file_bytes"]),
                    f"{v['bytes_per_entry']:.2f}"] for size, r in res["sizes"].items() for v in r.get("vectors", [])])]
    L += ["", "### Denoise + mask of a whole-model delta, and model size", "",
          "| size | maskable entries | denoise (energy 0.90, ρ 0.05) | global top-k (5.2 %) |", "|---|---|---|---|"]
    for size, r in res["sizes"].items():
        if "denoise" in r:
            d = r["denoise"]
            L.append(f"| {size} | {r.get('maskable', 0):,} | {d['denoise_s']:.2f} s | {d['top_k_s']:.2f} s |")
    if res.get("rss"):
        r = res["rss"]
        L += ["", "### A whole language SFT run (subprocess)", "",
              f"`python {r['command']}`: wall {r['wall_s']:.0f} s, peak RSS {_mb(r['max_rss_bytes'])}"
              + f"; other processes used {_cores(r.get('other_cores'))} cores meanwhile."]
        ph = r.get("phase_step_s", {})
        if "full" in ph and "sparse" in ph:
            L += ["", f"Step time inside that run (Trainer loop, median over its logged intervals): full phase "
                      f"{ph['full'] * 1e3:.0f} ms, sparse phase {ph['sparse'] * 1e3:.0f} ms, sparse / full "
                      f"{ph['sparse'] / ph['full']:.2f}."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES, help="model sizes to measure")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="SFT kinds for the step-time comparison")
    p.add_argument("--repeats", type=int, default=9, help="timed steps (and vector-op repeats)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps before timing (they also make the mask)")
    p.add_argument("--batch", type=int, default=16, help="batch size for tiny and MiniLM")
    p.add_argument("--seq", type=int, default=64, help="tokens per example")
    p.add_argument("--xlmr-batch", type=int, default=8, help="batch size for xlmr-base shapes")
    p.add_argument("--vector-shares", type=float, nargs="+", default=[0.005, *DEFAULT_K.values(), 0.10],
                   help="k (share of maskable entries) for the vector-operation table")
    p.add_argument("--state-shares", type=float, nargs="+", default=list(DEFAULT_K.values()),
                   help="two (or more) k for the optimizer-state table")
    p.add_argument("--rss-model", default="minilm", help="base model of the whole language SFT run (an alias "
                   "or a folder with a tokenizer); 'none' skips it")
    p.add_argument("--rss-args", nargs=argparse.REMAINDER, default=[],
                   help="extra train-language options for that run (after everything else)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timed step loop and the whole-run measurement, wait up to SECONDS for other "
                        "processes to use < 0.15 cores (shared machine)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of one full and one sparse step")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "perf" / "results"), help="results prefix")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be >= 1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    res = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "machine": machine_info("torch"), "sizes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="deftx-perf-"))
    try:
        for size in args.sizes:
            src = model_source(size, tmp)
            r: dict = {"source": src, "steps": [], "optimizer_vs_k": []}
            batch = args.xlmr_batch if size == "xlmr-base" else args.batch
            for kind in args.kinds:
                print(f"[{size}] {kind}: full vs sparse step, {args.warmup} warm-up + {args.repeats} timed ...",
                      flush=True)
                s = step_times(src, kind, batch, args.seq, args.repeats, args.warmup, args.profile, args.wait_quiet)
                r["steps"].append(s)
                quiet = f", their median ratio {s['quiet_median_pair_ratio']:.2f})" if s["quiet_pairs"] else ")"
                print(f"    full {s['full_median_s'] * 1e3:.0f} ms, sparse {s['sparse_median_s'] * 1e3:.0f} ms, "
                      f"ratio {s['ratio_of_medians']:.2f} (per-batch median {s['median_pair_ratio']:.2f}; "
                      f"{s['quiet_pairs']} quiet pairs{quiet}", flush=True)
                if args.profile:
                    print(s["profile"]["full"], s["profile"]["sparse"], sep="\n")
                r["maskable"] = s["maskable"] if kind == "task" else r.get("maskable", s["maskable"])
                for o in optimizer_state_vs_k(src, kind, args.state_shares):
                    r["optimizer_vs_k"].append({"kind": kind, **o})
            print(f"[{size}] vector operations ...", flush=True)
            repeats = max(1, min(args.repeats, 3 if size == "xlmr-base" else 5))
            r["vectors"] = vector_ops(src, args.vector_shares, repeats, tmp)
            print(f"[{size}] denoise + mask ...", flush=True)
            r["denoise"] = denoise_mask_time(src, 1 if size == "xlmr-base" else max(1, min(args.repeats, 3)))
            res["sizes"][size] = r
            gc.collect()
        if args.rss_model != "none":
            print(f"whole language SFT run (cpu-demo preset, {args.rss_model}) ...", flush=True)
            wait_quiet(args.wait_quiet, "the whole language SFT run")
            with OtherCpu() as other:
                res["rss"] = language_sft_rss(args.rss_model, args.rss_args)
            res["rss"]["other_cores"] = other.cores
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    write_outputs(out, res, markdown(res))
    print(f"results: {prefixed(out, '.md')}, {prefixed(out, '.json')}")
    return res


if __name__ == "__main__":
    main()
