"""Engine-core benchmark: denoising, global top-k, sparse vectors and memory at XLM-R scale.

Usage::

    python -m benchmarks.core                          # xlm-roberta-base shapes, 3 repeats (a few minutes)
    python -m benchmarks.core --shapes tiny --repeats 1 # seconds; what tests/benchmarks/test_core.py runs

What it measures, on random deltas with EXACTLY the shapes of the chosen encoder's maskable parameters
(``deftx_engine.method.params.parameter_roles``: every encoder parameter except LayerNorm):

1. ``choose_mask``: ``denoise_deltas(inplace=True)`` with the default ``DenoiseConfig`` (energy 0.90, rho 0.05)
   over all deltas, then ``select_top_k`` with the paper's task k = 14,155,776 (scaled by the same share of the
   maskable entries for the smaller shape sets) -- each timed, and the total (target <= 30 s);
2. a 14.2M-entry ``SparseVector.from_diff`` on a real randomly initialised encoder whose parameters are
   theta0 + delta; ``apply`` / ``revert`` times (target <= 0.5 s each) with a bit-exact revert check
   (asserted), ``compose`` of two vectors, ``save`` / ``load`` times and the file size;
3. peak extra resident memory during step 1 above the baseline taken when the deltas already exist
   (a 10 ms /proc/self/status VmRSS sampling thread, plus VmHWM after resetting it through
   /proc/self/clear_refs when the kernel allows) against the model size (target <= 2x);

and, in the same run, the Gram-eigh ``spectrum`` against ``torch.linalg.svd(full_matrices=False)`` on the
word-embedding delta (svd once, time ratio and max |sigma difference| / sigma_max), plus two time splits
that show where the time goes, taken by the engine's own functions (their ``times=`` argument,
``deftx_engine.timing``): ``denoise_matrix`` on each distinct matrix shape step by step (transpose, Gram,
eigh, projection, residual threshold, index pass, scatter; rows starting with "alt:" time alternatives that
are NOT in the engine, for scale) and ``SparseVector.apply`` / ``revert`` step by step. Each section also reports how
many cores other processes used meanwhile (from /proc/stat), so a contended run can be recognised.

Shapes come from a config only, never a download: the encoder is instantiated on the ``meta`` device to
read names and shapes. ``xlmr-base`` is ``XLMRobertaConfig`` with xlm-roberta-base's published values
(the class defaults are BERT-sized: vocab 30,522, 512 positions, 2 token types; xlm-roberta-base has
250,002 / 514 / 1), pooler excluded (the task and MLM models have none), i.e. 277,414,656 maskable
entries. Delta generation is seeded and kept out of every timing.

Every figure is printed as a Markdown table line ``| figure | value | target | met |``; timed steps show
the median over ``--repeats``.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/core.py` finds deftx_engine

import torch  # noqa: E402

from benchmarks.common import OtherCpu, machine_info, wait_quiet  # noqa: E402
from deftx_engine.method.denoise import CHUNK_ROWS, DenoiseConfig, choose_mask, denoise_matrix, spectrum  # noqa: E402
from deftx_engine.method.params import module_type, parameter_roles  # noqa: E402
from deftx_engine.method.vectors import SparseVector, VectorMeta, base_fingerprint, compose  # noqa: E402

PAPER_TASK_K = 14_155_776           # the paper's task-SFT k for XLM-R base
XLMR_BASE_MASKABLE = 277_414_656    # maskable entries of xlm-roberta-base (LayerNorm and pooler excluded)
TARGETS = {"step1_total_s": 30.0, "apply_s": 0.5, "revert_s": 0.5, "peak_over_model": 2.0}
LOW_RANK = 32                       # rank of the structured part of each generated delta
DELTA_RMS = 1e-3                    # typical size of a fine-tuning delta entry


# ---- shapes -------------------------------------------------------------------------------------------
def _encoder_factory(shapes: str) -> tuple[Callable[[], torch.nn.Module], str]:
    """A zero-argument constructor of the encoder (random init) and a human label."""
    if shapes == "xlmr-base":
        from transformers import XLMRobertaConfig, XLMRobertaModel

        cfg = XLMRobertaConfig(vocab_size=250_002, max_position_embeddings=514, type_vocab_size=1,
                               layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        return (lambda: XLMRobertaModel(cfg, add_pooling_layer=False)), "xlm-roberta-base"
    from transformers import BertConfig, BertModel

    if shapes == "minilm":  # all-MiniLM-L6-v2
        cfg = BertConfig(vocab_size=30_522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
        return (lambda: BertModel(cfg, add_pooling_layer=False)), "all-MiniLM-L6-v2"
    if shapes == "tiny":
        cfg = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)
        return (lambda: BertModel(cfg, add_pooling_layer=False)), "tiny BERT"
    raise ValueError(f"unknown shape set {shapes!r}")


def maskable_shapes(factory: Callable[[], torch.nn.Module]) -> tuple[dict[str, tuple[int, ...]], int]:
    """Maskable parameter name -> shape (model order) and the model's total parameter count.

    Built on the ``meta`` device: nothing is allocated or downloaded.
    """
    with torch.device("meta"):
        model = factory()
    params = dict(model.named_parameters())
    roles = parameter_roles(model)
    return {n: tuple(params[n].shape) for n in roles.maskable}, sum(p.numel() for p in params.values())


def task_k(total: int) -> int:
    """The paper's k for XLM-R base; the same share of the maskable entries for other shape sets."""
    if total == XLMR_BASE_MASKABLE:
        return PAPER_TASK_K
    return max(1, int(round(total * PAPER_TASK_K / XLMR_BASE_MASKABLE)))


# ---- random deltas with a decaying spectrum ---------------------------------------------------------------
def make_delta(shape: tuple[int, ...], gen: torch.Generator, noise_share: float) -> torch.Tensor:
    """One seeded delta. A matrix is A diag(s) B + noise with s_i = 1/i (i <= 32), Gaussian A and B, scaled
    so the low-rank part carries (1 - noise_share) of the expected energy; 1-D tensors, and everything at
    ``noise_share`` 1 (no structure: the worst case for the energy rank), are Gaussian.

    The one home of random deltas and vectors in the benchmarks (``perf.py`` builds its random masks and
    vectors from ``make_deltas``)."""
    if len(shape) != 2 or noise_share >= 1.0:
        return torch.randn(shape, generator=gen) * DELTA_RMS
    m, n = shape
    r = min(LOW_RANK, m, n)
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
    # E ||A diag(s) B||_F^2 = m n sum(s^2): scale to (1 - noise_share) * m n * rms^2
    c = DELTA_RMS * math.sqrt((1.0 - noise_share) / float((s ** 2).sum()))
    a = torch.randn(m, r, generator=gen) * (s * c)
    b = torch.randn(r, n, generator=gen)
    out = torch.randn(m, n, generator=gen).mul_(DELTA_RMS * math.sqrt(noise_share))
    return out.addmm_(a, b)


def make_deltas(shapes: dict[str, tuple[int, ...]], seed: int, noise_share: float,
                changed_rows: int = 0) -> dict[str, torch.Tensor]:
    """Seeded deltas; ``changed_rows`` > 0: the word-embedding delta is nonzero in that many random rows only,
    as phase 1 leaves it (it trains the rows of the corpus's tokens; ``embedding_rows.py``)."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {name: make_delta(shape, gen, noise_share) for name, shape in shapes.items()}
    for name, d in deltas.items():
        if changed_rows and "word_embeddings" in name and changed_rows < d.shape[0]:
            keep = torch.zeros(d.shape[0], dtype=torch.bool)
            keep[torch.randperm(d.shape[0], generator=gen)[:changed_rows]] = True
            d[~keep] = 0.0
    return deltas


# ---- measuring --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil  # not Linux: fall back to psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Resident-memory high-water mark of a block, above the RSS at entry.

    A thread samples VmRSS every ``interval`` s; where /proc/self/clear_refs accepts "5" the kernel's own
    VmHWM is reset at entry and read at exit too (exact, catches spikes between samples).
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.baseline = self.sampled_peak = 0
        self.hwm_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sampled_peak = max(self.sampled_peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self._hwm_reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_reset = True
        except OSError:
            pass
        self.baseline = self.sampled_peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled_peak = max(self.sampled_peak, rss_bytes())
        if self._hwm_reset:
            kb = _status_kb("VmHWM")
            self.hwm_peak = kb * 1024 if kb is not None else None

    @property
    def peak(self) -> int:
        return max(self.sampled_peak, self.hwm_peak or 0)

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


Contention = partial(OtherCpu, min_wall=0.3)  # jiffy (10 ms) counters say nothing about shorter blocks
_WAIT = {"limit": 0.0, "waited": 0.0, "reruns": 0}  # --wait-quiet
CONTENDED = 0.25  # cores used by other processes above which a measurement counts as contended


def _quiet(what: str) -> None:
    """With --wait-quiet S > 0: before a timed section, wait (at most S s) for other processes to go quiet.
    On a shared machine this keeps other people's jobs out of the timings; what is left is still reported
    per section."""
    _WAIT["waited"] += wait_quiet(_WAIT["limit"], what)[0]


def _tries() -> int:
    return 3 if _WAIT["limit"] > 0 else 1


def _clean(other: OtherCpu, what: str, attempt: int) -> bool:
    """Keep a measurement unless it was contended and (with --wait-quiet) another try is left."""
    if other.cores is None or other.cores <= CONTENDED or attempt + 1 >= _tries():
        return True
    _WAIT["reruns"] += 1
    print(f"  {what}: other processes used {other.cores:.2f} cores; measuring again", file=sys.stderr, flush=True)
    return False


def measure(what: str, fn: Callable[[], object]) -> tuple[object, float, OtherCpu]:
    """fn() timed, with its contention; with --wait-quiet it waits first and re-runs a contended try."""
    for attempt in range(_tries()):
        _quiet(what)
        with Contention() as other:
            t0 = time.perf_counter()
            out = fn()
            t = time.perf_counter() - t0
        if _clean(other, what, attempt):
            return out, t, other
    raise AssertionError("unreachable")


def _others(xs: list[OtherCpu]) -> str:
    vals = [x.cores for x in xs if x.cores is not None]
    if not vals:
        return "n/a"
    return f"mean {statistics.mean(vals):.2f}, max {max(vals):.2f} cores" + (
        " (contended: timings are inflated)" if max(vals) > CONTENDED else "")


def timed(fn: Callable, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- output -----------------------------------------------------------------------------------------------
class Table:
    """Prints Markdown table lines and keeps every figure for callers (tests, RESULTS.md)."""

    def __init__(self, out: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.out = out
        self.rows: list[tuple[str, str, str, str]] = []
        self.missed: list[str] = []

    def head(self, title: str) -> None:
        self.out("")
        self.out(f"### {title}")
        self.out("| figure | value | target | met |")
        self.out("| --- | --- | --- | --- |")

    def row(self, figure: str, value: str, target: str = "", met: bool | None = None) -> None:
        flag = "" if met is None else ("yes" if met else "**NO (missed)**")
        if met is False:
            self.missed.append(figure)
        self.rows.append((figure, value, target, flag))
        self.out(f"| {figure} | {value} | {target} | {flag} |")

    def grid(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        """A table with its own columns (time splits)."""
        self.out("")
        self.out(f"### {title}")
        self.out("| " + " | ".join(header) + " |")
        self.out("|" + " --- |" * len(header))
        for r in rows:
            self.rows.append(tuple(r))
            self.out("| " + " | ".join(r) + " |")


def _s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def _gb(b: float) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def _med(xs: list[float], repeats: int) -> str:
    return _s(median(xs)) + (f" (median of {len(xs)}; min {_s(min(xs))}, max {_s(max(xs))})" if len(xs) > 1 else "")


# ---- the three steps --------------------------------------------------------------------------------------
def _group(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) != 2:
        return "1-D (biases)"
    if "word_embeddings" in name:
        return f"word embeddings {shape[0]}x{shape[1]}"
    return module_type(name) + " matrices"


def step1(shapes, k, repeats, seed, noise_share, table: Table, results: dict, changed_rows: int = 0,
          residual_scope: str = "changed"):
    """Denoise all deltas in place, then global top-k; returns the last repeat's deltas and mask."""
    cfg = DenoiseConfig(residual_scope=residual_scope)
    t_den, t_topk, t_tot, extras, others, group_times = [], [], [], [], [], {}
    deltas = mask = records = None
    for rep in range(repeats):
        for attempt in range(_tries()):
            deltas = mask = records = None
            gc.collect()
            deltas = make_deltas(shapes, seed, noise_share, changed_rows)  # untimed
            _quiet(f"step 1, repeat {rep + 1}")
            marks: list[tuple[str, float]] = []
            progress = lambda i, n, name: marks.append((name, time.perf_counter()))  # noqa: E731
            with PeakRSS() as mem, Contention() as other:
                t0, split = time.perf_counter(), {}
                mask, records = choose_mask(deltas, k, cfg, progress=progress, times=split)
                t1 = t0 + split["denoise"]
                t2 = t1 + split["top_k"]
            print(f"  [repeat {rep + 1}/{repeats}] denoise {t1 - t0:.2f} s, top-k {t2 - t1:.2f} s, "
                  f"peak extra {mem.extra / 1e9:.3f} GB, other processes {other.cores or 0:.2f} cores",
                  file=sys.stderr, flush=True)
            if _clean(other, f"step 1, repeat {rep + 1}", attempt):
                break
        t_den.append(t1 - t0)
        t_topk.append(t2 - t1)
        t_tot.append(t2 - t0)
        extras.append(mem)
        others.append(other)
        prev = t0
        per_group: dict[str, float] = {}
        for name, t in marks:
            g = _group(name, shapes[name])
            per_group[g] = per_group.get(g, 0.0) + (t - prev)
            prev = t
        for g, t in per_group.items():
            group_times.setdefault(g, []).append(t)
    assert sum(int(i.numel()) for i in mask.values()) == k

    mats = [r for r in records.values()]
    emb = next((r for n, r in records.items() if "word_embeddings" in n), None)
    other_ranks = sorted(r.rank for n, r in records.items() if "word_embeddings" not in n)
    emb_rows = f"{changed_rows:,} changed rows" if changed_rows else "every row changed"
    table.head(f"1. Denoise all + global top-k (k = {k:,}; word embeddings: {emb_rows}; residual scope "
               f"{residual_scope})")
    table.row("maskable entries / 2-D matrices", f"{sum(math.prod(s) for s in shapes.values()):,} / {len(mats)}")
    table.row("other processes' CPU use during the timed repeats", _others(others))
    table.row("denoise all (energy 0.90, rho 0.05, inplace)", _med(t_den, repeats))
    for g in sorted(group_times, key=lambda g: -median(group_times[g])):
        table.row(f"  of which {g}", _s(median(group_times[g])))
    table.row(f"global top-k (k = {k:,})", _med(t_topk, repeats))
    total = median(t_tot)
    table.row("denoise + top-k total", _med(t_tot, repeats), f"<= {TARGETS['step1_total_s']:.0f} s",
              total <= TARGETS["step1_total_s"])
    if emb is not None:
        table.row("rank chosen: word embeddings", f"{emb.rank} (energy kept {emb.energy_retained:.3f}; residual "
                                                  f"entries kept {emb.residual_kept:,})")
    if other_ranks:
        table.row("rank chosen: other matrices (min / median / max)",
                  f"{other_ranks[0]} / {other_ranks[len(other_ranks) // 2]} / {other_ranks[-1]}")
    results.update(step1_denoise_s=median(t_den), step1_topk_s=median(t_topk), step1_total_s=total,
                   step1_total_min_s=min(t_tot), step1_denoise_min_s=min(t_den))
    return deltas, mask, extras


def step3(extras: list[PeakRSS], model_bytes: int, table: Table, results: dict) -> None:
    worst = max(extras, key=lambda m: m.extra)
    ratio = worst.extra / model_bytes
    table.head("3. Peak extra memory during step 1")
    table.row("model size (float32 parameters)", _gb(model_bytes))
    table.row("RSS baseline (deltas exist) -> peak", f"{_gb(worst.baseline)} -> {_gb(worst.peak)}")
    table.row("peak extra RSS, 10 ms VmRSS sampler (worst repeat)", _gb(worst.sampled_peak - worst.baseline))
    table.row("peak extra RSS, VmHWM after clear_refs reset (worst repeat)",
              _gb(worst.hwm_peak - worst.baseline) if worst.hwm_peak is not None else "n/a (no clear_refs)")
    if model_bytes >= 100e6:
        table.row("peak extra / model size", f"{ratio:.2f}x", f"<= {TARGETS['peak_over_model']:.0f}x",
                  ratio <= TARGETS["peak_over_model"])
    else:  # a few MB of allocator and thread overhead would dwarf a tiny model
        table.row("peak extra / model size", f"{ratio:.2f}x",
                  f"<= {TARGETS['peak_over_model']:.0f}x (not judged below 100 MB)")
    results.update(peak_extra_bytes=worst.extra, model_bytes=model_bytes, peak_over_model=ratio)


def svd_comparison(shapes, seed, noise_share, repeats, table: Table, results: dict) -> None:
    """Gram-eigh ``spectrum`` vs ``torch.linalg.svd`` (run once) on the largest matrix delta."""
    name = max((n for n, s in shapes.items() if len(s) == 2), key=lambda n: math.prod(shapes[n]))
    gen = torch.Generator().manual_seed(seed + 7)
    delta = make_delta(shapes[name], gen, noise_share)
    if delta.shape[0] < delta.shape[1]:
        delta = delta.T.contiguous()
    m, n = delta.shape
    t_gram, others = [], []
    for _ in range(repeats):
        (sig_g, _v), t, other = measure("spectrum()", lambda d=delta: spectrum(d))
        t_gram.append(t)
        others.append(other)
    del _v
    (_u, sig_s, _vh), t_svd, other = measure("torch.linalg.svd",  # once (unless contended): it is slow
                                             lambda d=delta: torch.linalg.svd(d, full_matrices=False))
    others.append(other)
    del _u, _vh, delta
    gc.collect()
    err = float((sig_g - sig_s.double()).abs().max() / sig_s.double().max())
    table.head(f"Gram-eigh spectrum vs torch.linalg.svd on the {name} delta ({m}x{n})")
    table.row("other processes' CPU use", _others(others))
    table.row("deftx_engine.method.denoise.spectrum (Gram in float64 + eigh)", _med(t_gram, repeats))
    table.row("torch.linalg.svd(full_matrices=False), run once", _s(t_svd))
    table.row("svd time / Gram-eigh time", f"{t_svd / median(t_gram):.1f}x")
    table.row("max |sigma_gram - sigma_svd| / sigma_max", f"{err:.2e}")
    results.update(gram_s=median(t_gram), svd_s=t_svd, svd_over_gram=t_svd / median(t_gram), sigma_rel_err=err,
                   svd_matrix=name)


DENOISE_STEPS = {  # denoise_matrix's step names -> the rows of the time split, in the engine's order
    "transpose": "transpose in and out (wide matrices)",
    "gram": "Gram accumulation (float64)",
    "eigh": "eigh of the n x n Gram (float64)",
    "project": "projection L = d V_r V_r^T and residual",
    "threshold": "residual top-k: radix threshold (2 histogram passes)",
    "index": "residual top-k: index pass",
    "scatter": "scatter S into L",
}


def _profile_matrix(delta: torch.Tensor, cfg: DenoiseConfig, svd_s: float | None) -> tuple[dict[str, float], int]:
    """The engine's ``denoise_matrix`` on one matrix with its per-step times; then, for scale, a few
    alternatives that are NOT in the engine (rows starting with "alt:"). ``delta`` is overwritten."""
    times: dict[str, float] = {}
    _, record = denoise_matrix(delta, cfg, times=times)
    t = {label: times.get(key, 0.0) for key, label in DENOISE_STEPS.items()}
    clock = time.perf_counter
    tall = delta.T.contiguous() if delta.shape[0] < delta.shape[1] else delta
    m, n = tall.shape
    t0 = clock()
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, m, CHUNK_ROWS):
        c = tall[start:start + CHUNK_ROWS]
        gram += (c.T @ c).double()
    t["alt: Gram as float32 chunk products summed in float64"] = clock() - t0
    t0 = clock()
    torch.linalg.eigvalsh(gram)
    t["alt: eigvalsh (values only) of the Gram"] = clock() - t0
    if svd_s is None:
        t0 = clock()
        torch.linalg.svd(tall, full_matrices=False)
        svd_s = clock() - t0
    t["alt: torch.linalg.svd(float32) of the matrix"] = svd_s
    v100 = torch.linalg.eigh(gram)[1].flip(1)[:, :min(100, n)].to(tall.dtype)  # not timed
    t0 = clock()
    for start in range(0, m, CHUNK_ROWS):
        rows = tall[start:start + CHUNK_ROWS]
        rows.sub_((rows @ v100) @ v100.T)
    t["alt: projection at the fixed policy's r = 100"] = clock() - t0
    return t, record.rank


def denoise_profile(shapes, seed, noise_share, repeats, measured_s: float, table: Table, results: dict) -> None:
    """Where denoise-all spends its time: every distinct 2-D shape profiled step by step (median over
    ``repeats``; matrices of >= 50M entries once), times the number of matrices of that shape."""
    cfg = DenoiseConfig()
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            groups.setdefault(shape, []).append(name)
    order = sorted(groups, key=lambda s: -math.prod(s) * len(groups[s]))
    per_shape: dict[tuple[int, ...], dict[str, float]] = {}
    ranks: dict[tuple[int, ...], int] = {}
    others: list[OtherCpu] = []
    for shape in order:
        runs = 1 if math.prod(shape) >= 50_000_000 else repeats
        gen = torch.Generator().manual_seed(seed + 11)
        svd_s = results.get("svd_s") if groups[shape][0] == results.get("svd_matrix") else None
        samples = []
        for _ in range(runs):
            for attempt in range(_tries()):
                d = make_delta(shape, gen, noise_share)
                _quiet(f"profiling {shape[0]}x{shape[1]}")
                with Contention() as other:
                    split, ranks[shape] = _profile_matrix(d, cfg, svd_s)
                del d
                gc.collect()
                if _clean(other, f"profiling {shape[0]}x{shape[1]}", attempt):
                    break
            others.append(other)
            samples.append(split)
        per_shape[shape] = {k_: median([s_[k_] for s_ in samples]) * len(groups[shape]) for k_ in samples[0]}
    steps = list(next(iter(per_shape.values())))
    engine_steps = [k_ for k_ in steps if not k_.startswith("alt:")]
    grand = sum(per_shape[s][k_] for s in order for k_ in engine_steps)
    header = ["step"] + [f"{s[0]}x{s[1]} (x{len(groups[s])}, r={ranks[s]})" for s in order] + ["all matrices",
                                                                                               "share"]
    rows = []
    for k_ in steps:
        tot = sum(per_shape[s][k_] for s in order)
        share = f"{100 * tot / grand:.0f} %" if k_ in engine_steps and grand > 0 else ""
        rows.append([k_] + [f"{per_shape[s][k_]:.2f}" for s in order] + [f"{tot:.2f}", share])
    rows.append(["sum of the engine's steps"] + [f"{sum(per_shape[s][k_] for k_ in engine_steps):.2f}"
                                                 for s in order] + [f"{grand:.2f}", "100 %"])
    table.grid("Where denoise-all spends its time (seconds; per-matrix median x number of matrices; "
               f"other processes' CPU use: {_others(others)}; the timed denoise-all took {_s(measured_s)})",
               header, rows)
    results["denoise_split"] = {f"{s[0]}x{s[1]}": per_shape[s] for s in order}


APPLY_STEPS = {  # SparseVector.apply / revert step names -> the rows of the time split
    "validate": "apply: validate (fingerprint, shapes)",
    "save": "apply: save old entries (index_select on int32 indices)",
    "add": "apply: index_add_",
    "heads": "apply: heads",
}
REVERT_STEPS = {
    "indices": "revert: int32 -> int64 indices (index_copy_ needs int64)",
    "write back": "revert: write back (index_copy_)",
    "heads": "revert: heads",
}


def step2(factory, shapes, deltas, mask, k, seed, noise_share, repeats, table: Table, results: dict) -> None:
    """A real vector on a real (randomly initialised) encoder: from_diff, apply/revert, compose, save/load."""
    torch.manual_seed(seed)
    (model, t_init) = timed(factory)
    model.eval()
    params = dict(model.named_parameters())
    assert set(shapes) <= set(params), "meta and CPU models disagree on parameter names"
    theta0 = {n: params[n].detach().clone() for n in shapes}
    reference = {n: p.detach().clone() for n, p in params.items() if n not in shapes}  # LayerNorm etc.
    fp = base_fingerprint(model)

    def vector_from(d: dict[str, torch.Tensor], m: dict[str, torch.Tensor], kind: str) -> tuple[SparseVector, float]:
        with torch.no_grad():
            for n in shapes:
                params[n].copy_(theta0[n]).add_(d[n])
        meta = VectorMeta(kind=kind, base_model="xlm-roberta-base shapes (random init)", base_fingerprint=fp,
                          language="xx", method="deftx", denoise=DenoiseConfig().to_dict())
        vec, t = timed(SparseVector.from_diff, meta, theta0, model, m)
        with torch.no_grad():
            for n in shapes:
                params[n].copy_(theta0[n])
        return vec, t

    # of the task k, but kind "language": a task vector must carry a classifier head and its labels to be saved
    vec, t_from = vector_from(deltas, mask, "language")
    assert vec.nnz == k

    def bit_exact() -> bool:
        return (all(torch.equal(params[n], theta0[n]) for n in shapes)
                and all(torch.equal(params[n], t) for n, t in reference.items()))

    def reverted() -> bool:
        """Whether the model is theta0 bit for bit again (compared with the copies taken before any apply); if
        not, it is put back from those copies, so the next repeat and the later steps start from theta0."""
        if bit_exact():
            return True
        with torch.no_grad():
            for n in shapes:
                params[n].copy_(theta0[n])
            for n, t in reference.items():
                params[n].copy_(t)
        return False

    assert bit_exact(), "model is not theta0 before apply"
    t_apply, t_revert, applied_ok, revert_ok, others = [], [], True, True, []
    for _ in range(repeats):
        for attempt in range(_tries()):
            _quiet("apply / revert")
            with Contention() as other:
                _, ta = timed(vec.apply, model)
                for n, idx in vec.indices.items():  # exactness check, outside the two timings
                    i = idx.long()
                    applied_ok &= torch.equal(params[n].detach().view(-1)[i], theta0[n].view(-1)[i] + vec.values[n])
                _, tr = timed(vec.revert, model)
            revert_ok &= reverted()  # every try of every repeat, outside the timings
            if _clean(other, "apply / revert", attempt):
                break
        t_apply.append(ta)
        t_revert.append(tr)
        others.append(other)

    # apply / revert, step by step: the engine's own per-step times
    split: dict[str, list[float]] = {}

    def note(key: str, seconds: float) -> None:
        split.setdefault(key, []).append(seconds)

    def split_once() -> None:
        nonlocal revert_ok
        applied: dict[str, float] = {}
        undone: dict[str, float] = {}
        vec.apply(model, times=applied)
        vec.revert(model, times=undone)
        revert_ok &= reverted()
        for key, seconds in applied.items():
            note(APPLY_STEPS[key], seconds)
        for key, seconds in undone.items():
            note(REVERT_STEPS[key], seconds)
        longs = {n: i.long() for n, i in vec.indices.items()}  # for the alternatives (not timed)
        with torch.no_grad():
            t0 = time.perf_counter()
            _ = {n: params[n].data.view(-1)[i].clone() for n, i in longs.items()}
            note("alt: save old entries with fancy indexing (flat[idx].clone())", time.perf_counter() - t0)
            t0 = time.perf_counter()
            _ = all(bool(torch.isfinite(v.sum())) for v in vec.values.values())
            note("alt: finiteness via isfinite(values.sum())", time.perf_counter() - t0)
        del longs, _

    for _ in range(repeats):
        for attempt in range(_tries()):
            before = {k_: len(v_) for k_, v_ in split.items()}
            _quiet("the apply / revert split")
            with Contention() as other:
                split_once()
            if _clean(other, "the apply / revert split", attempt):
                break
            for k_, v_ in split.items():  # drop the contended try
                del v_[before.get(k_, 0):]
    split_rows = [[k_, _s(median(v_)), ""] for k_, v_ in split.items()]
    for side in ("apply", "revert"):
        tot = sum(median(v_) for k_, v_ in split.items() if k_.startswith(side + ":"))
        split_rows.append([f"{side}: sum of the steps", _s(tot), _s(median(t_apply if side == "apply" else t_revert))
                           + " measured"])

    # a second vector (another seed, LT-SFT style: top-k of the raw delta) to compose with
    deltas_b = make_deltas(shapes, seed + 1000, noise_share)
    vec_b, _ = vector_from(deltas_b, choose_mask(deltas_b, k, None)[0], "language")
    del deltas_b
    gc.collect()
    t_comp = []
    for _ in range(repeats):
        both, t, other = measure("compose", lambda: compose([vec, vec_b]))
        t_comp.append(t)
        others.append(other)
    shared = vec.nnz + vec_b.nnz - both.nnz

    tmp = Path(tempfile.mkdtemp(prefix="deftx-bench-"))
    try:
        folder = tmp / "task_sft"
        t_save, t_load = [], []
        for _ in range(repeats):
            _, t, other = measure("save", lambda: vec.save(folder))
            t_save.append(t)
            loaded, t, other2 = measure("load", lambda: SparseVector.load(folder))
            t_load.append(t)
            others += [other, other2]
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert all(torch.equal(loaded.indices[n], vec.indices[n]) and torch.equal(loaded.values[n], vec.values[n])
                   for n in vec.indices)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table.head(f"2. Sparse vector of {vec.nnz:,} entries on a real encoder")
    table.row("encoder built on CPU (random init)", f"{sum(p.numel() for p in params.values()):,} parameters, "
              f"{_s(t_init)}")
    table.row("other processes' CPU use during the timed steps", _others(others))
    table.row("SparseVector.from_diff", _s(t_from))
    table.row("apply (validate + index_add_)", _med(t_apply, repeats), f"<= {TARGETS['apply_s']} s",
              median(t_apply) <= TARGETS["apply_s"])
    table.row("revert (write back saved entries)", _med(t_revert, repeats), f"<= {TARGETS['revert_s']} s",
              median(t_revert) <= TARGETS["revert_s"])
    table.row("revert restores bit-exactly (checked, every repeat)", "yes" if revert_ok else "NO", "bit-exact",
              revert_ok)
    table.row("applied entries equal theta0 + phi exactly", "yes" if applied_ok else "no")
    table.row(f"compose of two {k:,}-entry vectors", _med(t_comp, repeats) + f"; {both.nnz:,} entries "
              f"({shared:,} shared)")
    table.row("save (safetensors + JSON, atomic rename)", _med(t_save, repeats))
    table.row("load (+ check)", _med(t_load, repeats) + " (file just written: page cache warm)")
    table.row("file size on disk", f"{_gb(size)} ({size / vec.nnz:.2f} bytes per entry)")
    table.grid("Where apply / revert spend their time (median over repeats)",
               ["step", "time", "note"], split_rows)
    results.update(apply_split={k_: median(v_) for k_, v_ in split.items()})
    results.update(apply_s=median(t_apply), revert_s=median(t_revert), revert_bit_exact=revert_ok,
                   compose_s=median(t_comp), save_s=median(t_save), load_s=median(t_load), file_bytes=size)


# ---- entry point ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.core",
        description="Time DeFT-X engine core steps (denoise + global top-k, sparse vectors, memory) on random "
                    "deltas with an encoder's exact parameter shapes. Prints Markdown table lines.")
    p.add_argument("--shapes", choices=["xlmr-base", "minilm", "tiny"], default="xlmr-base",
                   help="parameter shapes: xlm-roberta-base (277M maskable, default; a few minutes), "
                        "all-MiniLM-L6-v2, or a tiny BERT (vocab 120, hidden 16, 2 layers; seconds)")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeats of each timed step; the median is reported (default 3; 1 works)")
    p.add_argument("--seed", type=int, default=0, help="seed for the deltas and the model init (default 0)")
    p.add_argument("--noise-share", type=float, default=0.05,
                   help="share of each generated matrix delta's energy that is Gaussian noise on top of the "
                        "rank-32, s_i = 1/i part (default 0.05)")
    p.add_argument("--changed-rows", type=int, default=0,
                   help="step 1: the word-embedding delta is nonzero in this many rows only, as phase 1 leaves it "
                        "(default 0: every row, a dense delta)")
    p.add_argument("--step1-only", action="store_true",
                   help="only denoise + top-k and its memory (steps 1 and 3): to compare --residual-scope values")
    p.add_argument("--residual-scope", choices=["changed", "matrix"], default="changed",
                   help="step 1: what rho is a share of (DenoiseConfig.residual_scope; default changed)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="for a shared machine: before each timed measurement wait up to SECONDS for other "
                        "processes to use < 0.15 cores, and measure again (at most twice) when they used > 0.25 "
                        "cores meanwhile (default 0: no waiting, no re-runs)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    torch.manual_seed(args.seed)
    _WAIT.update(limit=args.wait_quiet, waited=0.0, reruns=0)
    factory, label = _encoder_factory(args.shapes)
    shapes, model_numel = maskable_shapes(factory)
    total = sum(math.prod(s) for s in shapes.values())
    k = task_k(total)
    table = Table()
    results: dict = {"shapes": args.shapes, "k": k, "maskable": total}

    out = lambda line="": print(line, flush=True)  # noqa: E731
    out(f"# DeFT-X engine core benchmark: {label} shapes, --repeats {args.repeats}, seed {args.seed}")
    out("command: python -m benchmarks.core " + " ".join(argv if argv is not None else sys.argv[1:]))
    results["machine"] = info = machine_info("torch", "transformers")
    for key, val in info.items():
        out(f"{key}: {val}")
    out(f"deltas: per matrix rank-{LOW_RANK} part with s_i = 1/i + Gaussian noise carrying "
        f"{args.noise_share:.0%} of the energy, entry rms {DELTA_RMS:g}; generation not timed")

    t_start = time.perf_counter()
    deltas, mask, mem = step1(shapes, k, args.repeats, args.seed, args.noise_share, table, results,
                              args.changed_rows, args.residual_scope)
    step3(mem, model_numel * 4, table, results)
    if not args.step1_only:
        svd_comparison(shapes, args.seed, args.noise_share, args.repeats, table, results)
        denoise_profile(shapes, args.seed, args.noise_share, args.repeats, results["step1_denoise_min_s"], table,
                        results)
        step2(factory, shapes, deltas, mask, k, args.seed, args.noise_share, args.repeats, table, results)
    del deltas, mask
    gc.collect()

    out("")
    out(f"wall time of the whole benchmark: {time.perf_counter() - t_start:.0f} s; load average at end: "
        + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.wait_quiet > 0:
        out(f"waited {_WAIT['waited']:.0f} s in total for a quiet machine (--wait-quiet {args.wait_quiet:g}); "
            f"{_WAIT['reruns']} contended measurement(s) re-run")
    out("targets missed: " + (", ".join(table.missed) if table.missed else "none"))
    results["missed"] = table.missed
    results["rows"] = table.rows
    return results


if __name__ == "__main__":
    main()
