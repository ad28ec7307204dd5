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

import torch

from .constants import TIES_DENSITY, TIES_LAMBDA
from .errors import VectorError
from .masks import select_top_k
from .vectors import SparseVector, VectorMeta, check_composable


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
    first = vectors[0].meta
    meta = VectorMeta(kind="task" if tasks else "composed", base_model=first.base_model,
                      base_fingerprint=first.base_fingerprint,
                      language="+".join(v.meta.language for v in vectors if v.meta.language),
                      label_names=list(tasks[0].meta.label_names) if tasks else [], method="ties",
                      extra={"ties": {"density": density, "lambda": lam},
                             "components": [{"kind": v.meta.kind, "language": v.meta.language,
                                             "method": v.meta.method} for v in vectors]})
    out = SparseVector(meta)
    for name in dict.fromkeys(n for t in trimmed for n in t):
        parts = [t[name] for t in trimmed if name in t]
        idx = torch.cat([p[0] for p in parts])
        val = torch.cat([p[1] for p in parts])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        mass = torch.zeros(uniq.numel(), dtype=val.dtype).index_add_(0, inverse, val)
        elected = torch.sign(mass)
        agree = (torch.sign(val) == elected[inverse]) & (val != 0)
        total = torch.zeros_like(mass).index_add_(0, inverse, torch.where(agree, val, torch.zeros_like(val)))
        count = torch.zeros_like(mass).index_add_(0, inverse, agree.to(val.dtype))
        keep = count > 0  # elected sign 0 (exact cancellation) or no agreeing value: entry dropped
        out.indices[name] = uniq[keep].to(torch.int32)
        out.values[name] = (total[keep] / count[keep]) * lam
        out.shapes[name] = next(v.shapes[name] for v in vectors if name in v.shapes)
    if tasks:
        out.heads = dict(tasks[0].heads)
        out.shapes.update({n: tasks[0].shapes[n] for n in tasks[0].heads})
    out.meta.k = out.nnz
    return out
