"""TIES merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models") of sparse
fine-tuning vectors: ``deftx compose|evaluate|predict --merge ties`` and the ``ties`` method of
``benchmarks/crosslingual.py``.

TIES replaces the plain sum theta0 + phi_task + phi_language by three steps:

1. **Trim**: each vector keeps only its ``density`` share (default ``TIES_DENSITY``, 20 %) of entries with
   the largest |value|, chosen globally over all of the vector's parameters. Our vectors are already
   sparse, so the share is taken of the entries each vector *stores* (its nnz), not of the whole model.
2. **Elect sign**: per entry, the sign of the summed trimmed values ("total mass") wins.
3. **Disjoint mean**: per entry, the mean of the trimmed values that agree with the elected sign (entries
   whose values disagree with it are left out of the mean; an entry whose mass is exactly 0 is dropped).

The result is scaled by ``lam`` (TIES' lambda, ``TIES_LAMBDA`` = 1.0 by default). Where the vectors do not
overlap, the disjoint mean of one value is the value itself, so TIES differs from a sum only by the trimming
and on the shared entries (a mean instead of a sum). Heads (classification head) are taken whole from the
task vector.

Pure function on ``SparseVector`` index/value tensors; the exact global top-k is the engine's
``masks.select_top_k`` (the same selection the SFT masks use).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from ..constants import TIES_DENSITY, TIES_LAMBDA
from ..errors import VectorError
from .masks import select_top_k
from .vectors import SparseVector, check_composable, merge_core


def trim(vec: SparseVector, density: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The vector's ``round(density * nnz)`` largest-|value| entries: ``{name: (flat indices, values)}``.

    Ties at the threshold go to the earlier parameter, then the lower position (``select_top_k``'s rule).
    """
    if not 0.0 < density <= 1.0:
        raise VectorError(f"TIES density must be in (0, 1], got {density}")
    names = [n for n in vec.indices if vec.indices[n].numel()]
    keep = int(round(density * sum(vec.indices[n].numel() for n in names)))
    chosen = select_top_k({n: vec.values[n] for n in names}, keep)
    return {n: (vec.indices[n].long()[chosen[n]], vec.values[n].float()[chosen[n]])
            for n in names if chosen[n].numel()}


def ties_merge(vectors: Sequence[SparseVector], density: float = TIES_DENSITY,
               lam: float = TIES_LAMBDA) -> SparseVector:
    """One vector: trim each input to ``density`` of its entries, elect a sign per entry by summed mass,
    average the agreeing values (disjoint mean), scale by ``lam``.

    With exactly one task vector among the inputs the result is a ``task`` vector carrying that vector's
    heads and labels (so ``evaluate.composed_model`` accepts it); otherwise a ``composed`` one. The inputs
    are checked as ``compose``'s are (``vectors.check_composable``): a ``composed`` input is refused.
    """
    tasks = check_composable(vectors, "ties_merge()")
    trimmed = [trim(v, density) for v in vectors]
    return merge_core(vectors, trimmed, partial(disjoint_mean, lam=lam), kind="task" if tasks else "composed",
                      method="ties", ties={"density": density, "lambda": lam})


def disjoint_mean(inverse: torch.Tensor, val: torch.Tensor, n: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per distinct index (``inverse`` maps each value to one of ``n``): the sign of the summed values wins, and
    ``lam`` times the mean of the values of that sign is kept; an index whose sum is exactly 0, or with no
    agreeing value, is dropped. Returns (kept indices as a mask, their values)."""
    mass = torch.zeros(n, dtype=val.dtype).index_add_(0, inverse, val)
    elected = torch.sign(mass)
    agree = (torch.sign(val) == elected[inverse]) & (val != 0)
    total = torch.zeros_like(mass).index_add_(0, inverse, torch.where(agree, val, torch.zeros_like(val)))
    count = torch.zeros_like(mass).index_add_(0, inverse, agree.to(val.dtype))
    keep = count > 0
    return keep, (total[keep] / count[keep]) * lam
