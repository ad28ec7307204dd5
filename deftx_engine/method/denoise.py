"""DeFT-X denoising of a weight delta: delta' = L + S.

L is the rank-r part of delta (largest singular values); S keeps the largest-magnitude share rho of the
residual delta - L *within that matrix*; everything else is treated as noise and dropped.

Why a Gram eigendecomposition and not ``torch.linalg.svd``: for a tall m x n delta (XLM-R's 250002 x 768
word embeddings) the singular values and right singular vectors come from the n x n matrix delta^T delta,
and L = delta V_r V_r^T needs no U at all. That is two matrix products over delta instead of a full SVD
(about 9x faster on the embeddings on 2 CPU cores, see benchmarks/RESULTS.md), and L is an exact
projection of delta, so a delta of exact rank r comes back to float tolerance. The Gram matrix is
accumulated in float64, which keeps sigma^2 accurate to ~1e-12 relative to sigma_max^2 -- the range the
energy rule looks at.

Which entries rho is a share of (``DenoiseConfig.residual_scope``). The paper magnitude-prunes each matrix's
higher-order residual to its largest 5 %, which assumes the matrix was trained as a whole. A phase-1 delta of
the word embeddings is not: only the rows of the tokens the corpus uses change (``embedding_rows.py``), a few
thousand of 250,002 on XLM-R. Counted over the whole matrix, 5 % of the entries is more than the residual has
nonzero entries, so the whole residual was kept and the matrix -- most of the maskable entries -- was not
denoised at all. So by default ("changed") a matrix is denoised as its *changed part*: the submatrix of the
rows and columns where the delta has any nonzero entry, and rho is a share of that submatrix's entries. The
low-rank part is the same either way (zero rows and columns add nothing to delta^T delta, and L = delta V V^T
is zero where delta's rows are), so only the residual's budget changes, to what the method intends: keep the
largest 5 % of the noise that phase 1 actually produced. A dense delta (every row and column changed) is
denoised exactly as before; the SVD of a few thousand changed rows is also far cheaper than of 250k rows.
"matrix" keeps the earlier count over every entry, for the ablation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError
from ..timing import Times, step
from .denoise_config import DenoiseConfig
from .masks import Mask, k_from, select_top_k

CHUNK_ROWS = 1 << 15  # rows per chunk when streaming over a tall matrix


@dataclass
class DenoiseRecord:
    """What denoising did to one matrix (for the spectrum plot and the vector's metadata)."""

    name: str
    shape: tuple[int, int]
    singular_values: list[float] = field(repr=False)
    rank: int
    energy_retained: float
    residual_kept: int
    changed_shape: tuple[int, int] | None = None  # rows x columns of the changed part (residual_scope "changed")


def spectrum(delta: Tensor, times: Times | None = None) -> tuple[Tensor, Tensor]:
    """Singular values (descending, float64) and the matching right singular vectors of a tall delta.

    Streams over row chunks so a 250k-row matrix never needs a float64 copy. ``times``: see ``timing``.
    """
    n = delta.shape[1]
    with step(times, "gram"):
        gram = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, delta.shape[0], CHUNK_ROWS):
            c = delta[start:start + CHUNK_ROWS].to(torch.float64)
            gram.addmm_(c.T, c)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # eigh of an n x n Gram (n <= a few thousand) is fast on one thread, and
    try:  # multi-threaded LAPACK stalls badly when other processes share the cores (0.2 s vs 11 s measured)
        with step(times, "eigh"):
            evals, evecs = torch.linalg.eigh(gram)
    finally:
        torch.set_num_threads(threads)
    return evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)


def choose_rank(sigma: Tensor, cfg: DenoiseConfig) -> int:
    """The rank r that ``cfg`` asks for, given descending singular values."""
    if cfg.rank_policy == "fixed":
        return min(cfg.rank, sigma.numel())
    power = sigma.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    cum = power.cumsum(0) / total
    return min(int((cum < cfg.energy - 1e-12).sum()) + 1, sigma.numel())


def _denoise_tall(delta: Tensor, cfg: DenoiseConfig, name: str, times: Times | None) -> DenoiseRecord:
    """Overwrite a contiguous tall (m >= n) ``delta`` with L + S; return the record."""
    sigma, v = spectrum(delta, times)
    r = choose_rank(sigma, cfg)
    power = sigma ** 2
    energy = float(power[:r].sum() / power.sum()) if float(power.sum()) > 0 else 1.0
    vr = v[:, :r].to(delta.dtype)
    with step(times, "project"):
        residual = torch.empty_like(delta)
        for start in range(0, delta.shape[0], CHUNK_ROWS):
            rows = delta[start:start + CHUNK_ROWS]
            low = (rows @ vr) @ vr.T
            residual[start:start + CHUNK_ROWS] = rows - low
            rows.copy_(low)
    keep = int(round(cfg.residual_share * residual.numel()))
    idx = select_top_k({"residual": residual}, keep, times=times)["residual"]
    with step(times, "scatter"):
        delta.view(-1)[idx] += residual.view(-1)[idx]
    return DenoiseRecord(name, tuple(delta.shape), sigma.float().tolist(), r, energy, keep)


def _denoise_oriented(delta: Tensor, cfg: DenoiseConfig, name: str, times: Times | None) -> DenoiseRecord:
    """Overwrite a contiguous 2-D ``delta`` with L + S; a wide matrix is denoised as its transpose."""
    if delta.shape[0] >= delta.shape[1]:
        return _denoise_tall(delta, cfg, name, times)
    with step(times, "transpose"):
        tall = delta.T.contiguous()
    record = _denoise_tall(tall, cfg, name, times)
    with step(times, "transpose"):
        delta.copy_(tall.T)
    record.shape = tuple(delta.shape)
    return record


def changed_part(delta: Tensor) -> tuple[Tensor, Tensor]:
    """The rows and the columns of ``delta`` that hold a nonzero entry (sorted int64 indices)."""
    rows = torch.zeros(delta.shape[0], dtype=torch.bool)
    cols = torch.zeros(delta.shape[1], dtype=torch.bool)
    for start in range(0, delta.shape[0], CHUNK_ROWS):  # a bool copy of a chunk at a time, not of the matrix
        nonzero = delta[start:start + CHUNK_ROWS] != 0
        rows[start:start + CHUNK_ROWS] = nonzero.any(1)
        cols |= nonzero.any(0)
    return rows.nonzero().squeeze(1), cols.nonzero().squeeze(1)


def _denoise_inplace(delta: Tensor, cfg: DenoiseConfig, name: str, times: Times | None = None) -> DenoiseRecord:
    """Overwrite a contiguous 2-D ``delta`` with L + S, over its changed part unless ``cfg`` says otherwise."""
    if cfg.residual_scope == "matrix":
        return _denoise_oriented(delta, cfg, name, times)
    with step(times, "support"):
        rows, cols = changed_part(delta)
    shape = (int(rows.numel()), int(cols.numel()))
    if shape == tuple(delta.shape):
        record = _denoise_oriented(delta, cfg, name, times)
    elif 0 in shape:  # nothing changed: nothing to keep
        record = DenoiseRecord(name, tuple(delta.shape), [0.0] * min(delta.shape), 0, 1.0, 0)
    else:
        with step(times, "support"):
            part = delta.index_select(0, rows).index_select(1, cols)
        record = _denoise_oriented(part, cfg, name, times)
        with step(times, "support"):
            delta[rows.unsqueeze(1), cols] = part  # outside the changed part L and S are zero, like delta
        record.shape = tuple(delta.shape)
    record.changed_shape = shape
    return record


def denoise_matrix(delta: Tensor, cfg: DenoiseConfig | None = None, name: str = "", *,
                   times: Times | None = None) -> tuple[Tensor, DenoiseRecord]:
    """delta' = L + S for one weight-matrix delta (a new tensor; ``delta`` is not changed).

    ``times`` (see ``timing``) gets the seconds of each step: support (finding and writing back the changed
    part), transpose (wide matrices), gram, eigh, project (L and the residual), threshold and index (the
    residual's top-k), scatter (S into L).
    """
    if delta.dim() != 2:
        raise ConfigError(f"{name or 'delta'}: denoising needs a 2-D matrix, got shape {tuple(delta.shape)}")
    out = delta.detach().clone().contiguous()
    return out, _denoise_inplace(out, cfg or DenoiseConfig(), name, times)


def denoise_deltas(deltas: Mapping[str, Tensor], cfg: DenoiseConfig | None = None, *, inplace: bool = False,
                   progress: Callable[[int, int, str], None] | None = None
                   ) -> tuple[dict[str, Tensor], dict[str, DenoiseRecord]]:
    """Denoise every 2-D delta of a model; 1-D tensors (biases) pass through unchanged.

    ``inplace=True`` overwrites the given tensors, so denoising a whole model costs one matrix of extra
    memory at a time instead of a second copy of the model.
    """
    cfg = cfg or DenoiseConfig()
    out: dict[str, Tensor] = {}
    records: dict[str, DenoiseRecord] = {}
    for i, (name, d) in enumerate(deltas.items()):
        if d.dim() == 2:
            target = d if inplace and d.is_contiguous() else d.detach().clone().contiguous()
            records[name] = _denoise_inplace(target, cfg, name)
            out[name] = target
        else:
            out[name] = d
        if progress:
            progress(i + 1, len(deltas), name)
    return out, records


def choose_mask(deltas: dict[str, Tensor], k: int | float, denoise: DenoiseConfig | None, *,
                progress: Callable[[int, int, str], None] | None = None,
                times: Times | None = None) -> tuple[Mask, dict[str, DenoiseRecord]]:
    """The mask of a phase-1 delta: denoised per ``denoise`` (DeFT-X) or as it is (``None``: LT-SFT), then the
    global top-k (``masks.select_top_k``; ``k`` a count or a share of all entries, ``masks.k_from``).

    Here, not in masks.py: denoising already builds on masks (its residual's top-k), so the step using both sits on top.
    ``deltas`` is denoised in place (no second copy of the model): afterwards it holds the values the mask was chosen
    from. ``progress`` is ``denoise_deltas``'; ``times`` (see ``timing``) gets the seconds of "denoise" and "top_k".
    Returns the mask and the records of the denoised matrices (none for LT-SFT).
    """
    records: dict[str, DenoiseRecord] = {}
    if denoise is not None:
        with step(times, "denoise"):
            denoised, records = denoise_deltas(deltas, denoise, inplace=True, progress=progress)
            deltas.update(denoised)  # a non-contiguous matrix was denoised as a copy
    with step(times, "top_k"):
        mask = select_top_k(deltas, k_from(k, sum(d.numel() for d in deltas.values())))
    return mask, records
