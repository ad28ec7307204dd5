"""Sparse masks: exact global top-k selection, densities and overlap.

A mask is a ``dict[name, LongTensor]`` of sorted row-major flat indices: the same layout a sparse vector
stores, so masks and vectors are compared with the same functions.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError
from ..timing import Times, step
from .params import layer_of, module_type, param_group

Mask = dict[str, Tensor]
_CHUNK = 1 << 22  # elements per pass: bounds the temporaries on 250k x 768 embeddings


def _bits(chunk: Tensor) -> Tensor:
    """|x| as int32 bit patterns: for non-negative floats, integer order equals float order."""
    return chunk.detach().abs().to(torch.float32).contiguous().view(torch.int32)


def _chunks(t: Tensor):
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start:start + _CHUNK]


def _threshold(scores: Mapping[str, Tensor], k: int) -> tuple[int, int]:
    """Bit pattern T of the k-th largest |score| and how many entries equal to T are taken.

    Two-level radix select (16 high bits, then 16 low bits) with ``bincount``: exact, three passes over
    the data, no sort and no copy of the whole model, so it stays fast on 278M entries.
    """
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for t in scores.values():
        for _, c in _chunks(t):
            hist += torch.bincount((_bits(c) >> 16).long(), minlength=1 << 15)
    above = hist.flip(0).cumsum(0).flip(0)  # above[b] = entries in bins >= b
    hi = int((above >= k).nonzero().max())
    need = k - (int(above[hi + 1]) if hi + 1 < above.numel() else 0)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for t in scores.values():
        for _, c in _chunks(t):
            b = _bits(c)
            sel = b[(b >> 16) == hi]
            if sel.numel():
                low += torch.bincount((sel & 0xFFFF).long(), minlength=1 << 16)
    above_low = low.flip(0).cumsum(0).flip(0)
    lo = int((above_low >= need).nonzero().max())
    take_equal = need - (int(above_low[lo + 1]) if lo + 1 < above_low.numel() else 0)
    return (hi << 16) | lo, take_equal


def select_top_k(scores: Mapping[str, Tensor], k: int, *, times: Times | None = None) -> Mask:
    """Exactly ``k`` entries of largest |score| across all tensors.

    Ties at the threshold are broken deterministically: earlier tensor (in ``scores`` order), then lower
    flat index. Scores must be finite (NaN has no order). ``times`` (see ``timing``) gets the seconds of
    the radix threshold ("threshold") and of the pass that collects the indices ("index").
    """
    total = sum(t.numel() for t in scores.values())
    if not 0 <= k <= total:
        raise ConfigError(f"k = {k:,} is outside [0, {total:,}] (the number of maskable entries)")
    if k == total:
        return {n: torch.arange(t.numel(), dtype=torch.int64) for n, t in scores.items()}
    if k == 0:
        return {n: torch.empty(0, dtype=torch.int64) for n in scores}
    with step(times, "threshold"):
        thr, take_equal = _threshold(scores, k)
    mask: Mask = {}
    with step(times, "index"):
        for name, t in scores.items():
            parts = []
            for start, c in _chunks(t):
                b = _bits(c)
                keep = b > thr
                if take_equal:
                    eq = (b == thr).nonzero().squeeze(1)
                    if eq.numel():
                        eq = eq[:take_equal]
                        take_equal -= eq.numel()
                        keep[eq] = True
                parts.append(keep.nonzero().squeeze(1) + start)
            mask[name] = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return mask


def k_from(k: int | float, total: int) -> int:
    """A count, or a fraction of ``total`` when ``0 < k < 1`` (e.g. 0.028 for a language SFT)."""
    if isinstance(k, float) and 0 < k < 1:
        return int(round(k * total))
    if float(k) != int(k) or k < 0:
        raise ConfigError(f"k must be a count or a fraction in (0, 1); got {k}", field="k")
    return int(k)


def mask_size(mask: Mapping[str, Tensor]) -> int:
    return sum(int(i.numel()) for i in mask.values())


def densities(mask: Mapping[str, Tensor], shapes: Mapping[str, torch.Size],
              group: Callable[[str], str] | None = None) -> dict[str, float]:
    """Share of entries selected, per parameter, or per group (``params.layer_of``, ``module_type``)."""
    sel: dict[str, int] = defaultdict(int)
    size: dict[str, int] = defaultdict(int)
    for name, shape in shapes.items():
        key = group(name) if group else name
        size[key] += int(torch.Size(shape).numel())
        sel[key] += int(mask[name].numel()) if name in mask else 0
    return {key: sel[key] / size[key] if size[key] else 0.0 for key in size}


def _summary(a: int, b: int, shared: int) -> dict[str, float]:
    union = a + b - shared
    return {"a": a, "b": b, "shared": shared,
            "share_of_a": shared / a if a else 0.0, "share_of_b": shared / b if b else 0.0,
            "jaccard": shared / union if union else 0.0}


def overlap(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict:
    """Shared entries of two masks (or two vectors' index sets): overall, per layer, per module type, per
    parameter group (embeddings / attention / ffn / other: where the entries are), and per (layer, module type)
    cell keyed ``"layer.3|attn.Q"`` for heatmaps."""
    per_param = {}
    for name in sorted(set(a) | set(b)):
        ia = a.get(name, torch.empty(0, dtype=torch.int64)).long()
        ib = b.get(name, torch.empty(0, dtype=torch.int64)).long()
        shared = int(torch.isin(ia, ib, assume_unique=True).sum()) if ia.numel() and ib.numel() else 0
        per_param[name] = (int(ia.numel()), int(ib.numel()), shared)

    def grouped(key: Callable[[str], str]) -> dict[str, dict[str, float]]:
        acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for name, counts in per_param.items():
            for i, c in enumerate(counts):
                acc[key(name)][i] += c
        return {g: _summary(*c) for g, c in acc.items()}

    totals = [sum(c[i] for c in per_param.values()) for i in range(3)]
    return {"overall": _summary(*totals), "per_layer": grouped(layer_of), "per_module": grouped(module_type),
            "per_group": grouped(param_group),
            "per_layer_module": grouped(lambda n: f"{layer_of(n)}|{module_type(n)}")}
