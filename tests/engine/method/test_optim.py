"""SparseAdamW: state for the masked entries only, entries outside the mask never change (bit for bit), and
on the masked entries it is torch's AdamW."""
import pytest
import torch

from deftx_engine.method.optim import SparseAdamW

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)


def setup(seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(6, 5))
    idx = torch.tensor([0, 3, 7, 12, 29], dtype=torch.int32)
    return p, idx, [torch.randn(6, 5) * 3 for _ in range(5)]


def test_state_covers_only_the_masked_entries():
    p, idx, grads = setup()
    head = torch.nn.Parameter(torch.randn(3))
    opt = SparseAdamW([(p, idx), (head, None)], **HP)
    p.grad, head.grad = grads[0].clone(), torch.ones(3)
    opt.step()
    assert opt.state[p]["exp_avg"].numel() == opt.state[p]["exp_avg_sq"].numel() == idx.numel()
    assert opt.state[head]["exp_avg"].numel() == 3  # a head (index None) is trained whole
    assert opt.state_bytes() == (idx.numel() + 3) * 2 * 4 + 2 * 4  # two float32 moments per entry + step counters


def test_entries_outside_the_mask_never_change_bit_for_bit():
    p, idx, grads = setup()
    before = p.detach().clone()
    opt = SparseAdamW([(p, idx)], **HP)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    outside = torch.ones(p.numel(), dtype=torch.bool)
    outside[idx.long()] = False
    assert torch.equal(p.detach().view(-1)[outside], before.view(-1)[outside])
    assert not torch.equal(p.detach().view(-1)[idx.long()], before.view(-1)[idx.long()])


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_masked_entries_follow_torch_adamw(max_grad_norm):
    p, idx, grads = setup(1)
    ref = torch.nn.Parameter(p.detach().view(-1)[idx.long()].clone())
    opt = SparseAdamW([(p, idx)], max_grad_norm=max_grad_norm, **HP)
    ref_opt = torch.optim.AdamW([ref], foreach=False, **HP)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        masked = g.view(-1)[idx.long()].clone()
        if max_grad_norm:  # clipped over the masked entries only, as in phase 2
            masked *= min(1.0, max_grad_norm / (float(masked.norm()) + 1e-6))
        ref.grad = masked
        ref_opt.step()
    torch.testing.assert_close(p.detach().view(-1)[idx.long()], ref.detach(), rtol=1e-5, atol=1e-7)


def test_a_parameter_without_gradient_is_left_alone():
    p, idx, _ = setup()
    before = p.detach().clone()
    opt = SparseAdamW([(p, idx)], **HP)
    opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]


SHAPES = {"emb": (12, 5), "bias": (7,), "ffn": (4, 3, 2), "out": (9, 8)}


@pytest.mark.parametrize("mask", ["all", "partial"])
def test_several_parameters_follow_adamw_with_global_clipping(mask):
    """An independent reference: torch.optim.AdamW on full copies of several parameters of different shapes, its
    gradients clipped by torch.nn.utils.clip_grad_norm_ over all parameters at once (one global norm, as
    SparseAdamW promises), step by step. With a partial mask the reference sees the gradient only on the masked
    entries (so the norm counts those alone, as phase 2 does) and only those are compared; the other entries
    of the sparse side must stay theta0 bit for bit. The gradient scales differ by orders of magnitude between
    parameters and change from step to step, so clipping each tensor on its own gives other values."""
    g = torch.Generator().manual_seed(3)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    ref = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    if mask == "all":
        idx = {n: torch.arange(p.numel(), dtype=torch.int32) for n, p in params.items()}
    else:  # a different share of each parameter, never all of it
        idx = {n: torch.randperm(p.numel(), generator=g)[: max(1, p.numel() // (i + 2))].sort().values.to(torch.int32)
               for i, (n, p) in enumerate(params.items())}
    keep = {n: torch.zeros(p.numel()) for n, p in params.items()}
    for n, i in idx.items():
        keep[n][i.long()] = 1.0
    max_norm = 1.0
    opt = SparseAdamW([(params[n], idx[n]) for n in SHAPES], max_grad_norm=max_norm, **HP)
    ref_opt = torch.optim.AdamW([ref[n] for n in SHAPES], foreach=False, **HP)
    clipped_steps = 0
    for step in range(8):
        for n, p in params.items():
            scale = 10.0 ** float(torch.empty(()).uniform_(-2, 2, generator=g))  # per parameter and step
            grad = torch.randn(p.shape, generator=g) * scale
            p.grad = grad.clone()
            ref[n].grad = grad * keep[n].view(p.shape)
        total = torch.nn.utils.clip_grad_norm_([ref[n] for n in SHAPES], max_norm)  # the global norm
        clipped_steps += bool(total > max_norm)
        opt.step()
        ref_opt.step()
        for n, p in params.items():
            i = idx[n].long()
            got, want = p.detach().view(-1), ref[n].detach().view(-1)
            torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}, step {step}: {m}")
            outside = keep[n] == 0
            assert torch.equal(got[outside], theta0[n].view(-1)[outside]), (n, step)
    assert clipped_steps >= 6  # the clipping was really exercised


# ---- what mutation testing found unguarded (RESULTS.md, "Mutation testing") --------------------------------
def test_defaults_closure_and_a_parameter_without_gradient():
    from deftx_engine.method.optim import SparseAdamW

    frozen, p = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    opt = SparseAdamW([(frozen, None), (p, torch.tensor([1, 3]))])
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], opt.max_grad_norm) == \
        (5e-5, (0.9, 0.999), 1e-8, 0.0, 1.0)
    p.grad = torch.ones(4)
    assert opt.step(lambda: 7.0) == 7.0
    assert torch.equal(frozen.data, torch.ones(3))  # no gradient: untouched, and the next parameter still steps
    assert p.data[1] < 1 and p.data[3] < 1 and p.data[0] == 1 and p.data[2] == 1
