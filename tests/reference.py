"""Independent references for the method's math, written from the paper's description with plain torch
(``torch.linalg.svd``, ``torch.topk``) and none of the engine's code: the engine's faster paths (Gram
eigendecomposition, chunked radix top-k, the changed part) are checked against these."""
import torch


def denoise(d: torch.Tensor, energy: float, rho: float, scope: str = "changed") -> torch.Tensor:
    """delta' = L + S: L from the SVD of the whole matrix (float64, the smallest rank whose sigma^2 reaches
    ``energy``), S the largest ``rho`` of the residual, counted over the rows and columns that hold a nonzero
    entry ("changed") or over every entry ("matrix")."""
    d64 = d.double()
    u, s, vh = torch.linalg.svd(d64, full_matrices=False)
    if float((s ** 2).sum()) == 0.0:
        return d.clone()
    cum = (s ** 2).cumsum(0) / (s ** 2).sum()
    r = int((cum < energy - 1e-12).sum()) + 1
    low = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    res = d64 - low
    rows, cols = (d != 0).any(1), (d != 0).any(0)
    budget = int(rows.sum()) * int(cols.sum()) if scope == "changed" else d.numel()
    keep = res.abs().flatten().topk(round(rho * budget)).indices
    out = low.flatten().clone()
    out[keep] += res.flatten()[keep]
    return out.view_as(d64).float()


def global_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, set[int]]:
    """The flat indices of the k largest |score| over all tensors, from one ``torch.topk`` of their concatenation."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().double().abs().reshape(-1) for n in names])
    picked = flat.topk(k).indices
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        sel = picked[(picked >= start) & (picked < start + size)] - start
        out[n] = set(sel.tolist())
        start += size
    return out
