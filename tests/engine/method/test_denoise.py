import pytest
import reference
import torch

from deftx_engine.errors import ConfigError
from deftx_engine.method.denoise import DenoiseConfig, choose_rank, denoise_deltas, denoise_matrix


def low_rank(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (64, 64)])
def test_exact_rank_recovered_with_fixed_rank(shape):
    d = low_rank(*shape, r=6)
    out, rec = denoise_matrix(d, DenoiseConfig("fixed", rank=6, residual_share=0.0))
    assert rec.rank == 6
    assert torch.allclose(out, d, atol=1e-4 * d.abs().max())
    assert rec.energy_retained == pytest.approx(1.0, abs=1e-9)


def test_exact_rank_recovered_with_energy_policy():
    d = low_rank(200, 50, r=4, seed=1)
    out, rec = denoise_matrix(d, DenoiseConfig("energy", energy=0.999, residual_share=0.0))
    assert rec.rank <= 4
    assert torch.allclose(out, d, atol=1e-3 * d.abs().max())


def test_matches_svd_reference():
    d = torch.randn(120, 30, generator=torch.Generator().manual_seed(2))
    out, rec = denoise_matrix(d, DenoiseConfig("fixed", rank=5, residual_share=0.1))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    low = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    res = d - low
    keep = res.abs().flatten().topk(360).indices
    ref = low.flatten().clone()
    ref[keep] += res.flatten()[keep]
    assert torch.allclose(out.flatten(), ref, atol=1e-4)
    assert torch.allclose(torch.tensor(rec.singular_values), s, atol=1e-4)


def test_energy_rank_is_smallest_reaching_tau():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5])  # sigma^2 = 9, 4, 1, .25 -> cum 0.632, 0.912, 0.982, 1
    assert choose_rank(sigma, DenoiseConfig(energy=0.90)) == 2
    assert choose_rank(sigma, DenoiseConfig(energy=0.60)) == 1
    assert choose_rank(sigma, DenoiseConfig(energy=0.95)) == 3
    assert choose_rank(sigma, DenoiseConfig(energy=1.0)) == 4
    assert choose_rank(torch.zeros(3), DenoiseConfig()) == 0


def test_fixed_rank_clipped_to_matrix():
    d = torch.randn(10, 8)
    _, rec = denoise_matrix(d, DenoiseConfig("fixed", rank=100))
    assert rec.rank == 8


@pytest.mark.parametrize("rho", [0.0, 0.05, 0.3, 1.0])
def test_residual_share_is_exact(rho):
    d = torch.randn(50, 20, generator=torch.Generator().manual_seed(3))
    out, rec = denoise_matrix(d, DenoiseConfig("fixed", rank=2, residual_share=rho))
    low, _ = denoise_matrix(d, DenoiseConfig("fixed", rank=2, residual_share=0.0))
    changed = int(((out - low).abs() > 0).sum())
    assert rec.residual_kept == round(rho * 1000) == changed
    if rho == 1.0:
        assert torch.allclose(out, d, atol=1e-5)


def test_biases_pass_through_and_inplace():
    deltas = {"w": torch.randn(30, 10), "b": torch.randn(10)}
    orig_w = deltas["w"].clone()
    out, recs = denoise_deltas(deltas, DenoiseConfig("fixed", rank=1, residual_share=0.0))
    assert out["b"] is deltas["b"] and set(recs) == {"w"}
    assert torch.equal(deltas["w"], orig_w)  # not in place by default
    out2, _ = denoise_deltas(deltas, DenoiseConfig("fixed", rank=1, residual_share=0.0), inplace=True)
    assert out2["w"] is deltas["w"] and torch.allclose(deltas["w"], out["w"])


def test_zero_delta():
    out, rec = denoise_matrix(torch.zeros(20, 5))
    assert rec.rank == 0 and torch.equal(out, torch.zeros(20, 5))


@pytest.mark.parametrize("kw", [dict(rank_policy="svd"), dict(energy=0.0), dict(energy=1.5),
                                dict(residual_share=-0.1), dict(rank=-1)])
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        DenoiseConfig(**kw)


# ---- the changed part (residual_scope) against an independent reference ------------------------------------
def row_sparse(m=2000, n=48, share=0.03, seed=4):
    """A delta nonzero in ``share`` of its rows only, like a phase-1 word-embedding delta."""
    g = torch.Generator().manual_seed(seed)
    d = torch.zeros(m, n)
    rows = torch.randperm(m, generator=g)[: round(share * m)]
    d[rows] = low_rank(len(rows), n, 3, seed) + 0.3 * torch.randn(len(rows), n, generator=g)
    return d, rows


@pytest.mark.parametrize("transpose", [False, True], ids=["tall", "wide"])
def test_row_sparse_delta_is_denoised_within_its_changed_rows(transpose):
    d, rows = row_sparse()
    d = d.T.contiguous() if transpose else d
    out, rec = denoise_matrix(d, DenoiseConfig(energy=0.9, residual_share=0.05))
    ref = reference.denoise(d, 0.9, 0.05, "changed")
    assert torch.allclose(out, ref, atol=1e-4)
    assert not torch.allclose(out, d, atol=1e-3)  # really denoised: most of the residual is dropped
    changed = len(rows) * 48
    assert rec.residual_kept == round(0.05 * changed) and rec.changed_shape == ((60, 48) if not transpose else (48, 60))
    low, _ = denoise_matrix(d, DenoiseConfig(energy=0.9, residual_share=0.0))
    assert int(((out - low).abs() > 0).sum()) == round(0.05 * changed)  # exactly rho of the changed entries
    untouched = torch.ones(d.shape[1 if transpose else 0], dtype=torch.bool)
    untouched[rows] = False
    assert not (out.T if transpose else out)[untouched].any()  # rows phase 1 never changed stay zero


def test_row_sparse_delta_with_the_whole_matrix_scope_is_kept_whole():
    """The earlier count (the ablation): 5 % of all entries is more than the residual's nonzero entries."""
    d, _ = row_sparse()
    out, rec = denoise_matrix(d, DenoiseConfig(energy=0.9, residual_share=0.05, residual_scope="matrix"))
    assert torch.allclose(out, reference.denoise(d, 0.9, 0.05, "matrix"), atol=1e-4)
    assert torch.allclose(out, d, atol=1e-5) and rec.residual_kept == round(0.05 * d.numel())


def test_dense_delta_is_denoised_as_before():
    d = torch.randn(300, 40, generator=torch.Generator().manual_seed(5))
    d[7, 3] = 0.0  # a zero entry leaves every row and column changed
    new, rec_new = denoise_matrix(d, DenoiseConfig(energy=0.9, residual_share=0.05))
    old, rec_old = denoise_matrix(d, DenoiseConfig(energy=0.9, residual_share=0.05, residual_scope="matrix"))
    assert torch.equal(new, old) and rec_new.residual_kept == rec_old.residual_kept == 600
    assert torch.allclose(new, reference.denoise(d, 0.9, 0.05, "changed"), atol=1e-4)


def test_delta_with_zero_columns_is_denoised_within_its_changed_columns():
    d, _ = row_sparse(m=400, n=60, share=0.5)
    d[:, 40:] = 0.0
    out, rec = denoise_matrix(d, DenoiseConfig(energy=0.9, residual_share=0.1))
    assert rec.changed_shape == (200, 40)
    assert torch.allclose(out, reference.denoise(d, 0.9, 0.1, "changed"), atol=1e-4)


def test_bad_residual_scope():
    with pytest.raises(ConfigError, match="residual_scope"):
        DenoiseConfig(residual_scope="rows")


# ---- what mutation testing found unguarded (RESULTS.md, "Mutation testing") --------------------------------
def test_times_names_every_step_and_records_name_their_matrix():
    d, _ = row_sparse(m=300, n=20, share=0.1)
    times: dict = {}
    _, rec = denoise_matrix(d.T.contiguous(), DenoiseConfig(), "emb", times=times)  # wide: transposed
    assert set(times) == {"support", "transpose", "gram", "eigh", "project", "threshold", "index", "scatter"}
    assert all(t >= 0 for t in times.values())
    assert (rec.name, rec.shape, rec.changed_shape) == ("emb", (20, 300), (20, 30))
    _, rec = denoise_matrix(torch.randn(30, 10), DenoiseConfig(residual_scope="matrix"), "dense", times=times)
    assert (rec.name, rec.shape, rec.changed_shape) == ("dense", (30, 10), None)
    assert denoise_matrix(torch.randn(6, 4))[1].name == ""


def test_progress_and_the_default_config_of_denoise_deltas():
    calls = []
    deltas = {"a": torch.randn(12, 4), "b": torch.randn(4), "c": torch.randn(5, 9)}
    out, recs = denoise_deltas(deltas, progress=lambda i, n, name: calls.append((i, n, name)))
    assert calls == [(1, 3, "a"), (2, 3, "b"), (3, 3, "c")]
    assert set(recs) == {"a", "c"} and recs["a"].name == "a" and recs["a"].residual_kept == round(0.05 * 48)


def test_a_delta_with_one_changed_row_or_none(monkeypatch):
    import deftx_engine.method.denoise as dn

    monkeypatch.setattr(dn, "CHUNK_ROWS", 7)  # the changed row in the 3rd of 6 chunks: the others change nothing
    d = torch.zeros(40, 6)
    d[17] = torch.arange(1.0, 7.0)
    out, rec = denoise_matrix(d, DenoiseConfig(energy=0.9, residual_share=0.5))
    assert rec.changed_shape == (1, 6) and rec.rank == 1 and torch.allclose(out, d, atol=1e-5)
    out, rec = denoise_matrix(torch.zeros(7, 3), DenoiseConfig(), "z")
    assert (rec.name, rec.shape, rec.singular_values, rec.rank, rec.energy_retained, rec.residual_kept,
            rec.changed_shape) == ("z", (7, 3), [0.0, 0.0, 0.0], 0, 1.0, 0, (0, 0))


def test_energy_retained_matches_the_svd(monkeypatch):
    import deftx_engine.method.denoise as dn

    monkeypatch.setattr(dn, "CHUNK_ROWS", 7)  # many row chunks, in the Gram, the projection and the support
    d, _ = row_sparse(m=200, n=12, share=0.3)
    out, rec = denoise_matrix(d, DenoiseConfig(energy=0.8, residual_share=0.05))
    s = torch.linalg.svd(d.double()).S
    assert rec.energy_retained == pytest.approx(float((s[:rec.rank] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    assert torch.allclose(out, reference.denoise(d, 0.8, 0.05), atol=1e-4)


def test_energy_rank_at_the_boundary():
    sigma = torch.tensor([1.0, 1.0])  # cumulative energy 0.5, 1.0: 0.5 reaches tau = 0.5 with one component
    assert choose_rank(sigma, DenoiseConfig(energy=0.5)) == 1
