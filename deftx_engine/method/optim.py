"""AdamW that updates only the masked entries of each parameter, with state for those entries only.

The sparse phase of an SFT must (a) leave every entry outside the mask exactly at theta0 and (b) keep
optimizer state proportional to k, not to the model. Gradients are still computed densely by autograd;
this optimizer gathers the masked entries, clips them (the dense gradient norm would count entries that
never move), updates them and scatters the result back.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over ``(param, flat_indices or None)`` pairs; ``None`` means the whole tensor (a head)."""

    def __init__(self, params: Iterable[tuple[nn.Parameter, Tensor | None]], lr: float = 5e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0):
        pairs = list(params)
        super().__init__([p for p, _ in pairs], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm
        self._index = {p: (None if i is None else i.long().to(p.device)) for p, i in pairs}

    def state_bytes(self) -> int:
        """Bytes of optimizer state: two moments per trainable entry."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, Tensor))

    def _grads(self) -> list[tuple[nn.Parameter, Tensor]]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    idx = self._index[p]
                    g = p.grad.reshape(-1)
                    out.append((p, (g[idx] if idx is not None else g).float()))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = dict(self._grads())
        if self.max_grad_norm and grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads.values():
                g.mul_(coef)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p not in grads:
                    continue
                g = grads[p]
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(g)
                    st["exp_avg_sq"] = torch.zeros_like(g)
                st["step"] += 1
                t = float(st["step"])
                st["exp_avg"].lerp_(g, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (st["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                step_size = group["lr"] / (1 - beta1 ** t)
                flat = p.data.view(-1)
                idx = self._index[p]
                cur = (flat[idx] if idx is not None else flat).float()
                if group["weight_decay"]:
                    cur.mul_(1 - group["lr"] * group["weight_decay"])
                cur.addcdiv_(st["exp_avg"], denom, value=-step_size)
                if idx is not None:
                    flat.index_copy_(0, idx, cur.to(flat.dtype))
                else:
                    flat.copy_(cur)
        return loss
