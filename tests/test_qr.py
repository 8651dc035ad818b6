"""The canonical basis: orthonormal, unique, exact, and what the official maths computes."""

import pytest
import torch

from qrlora.qr import (apply_mask, basis_sketch, canonical_basis, delta_weight, masked_parameter_count,
                       sketch_disagreement)
from tests.official_reference import official_delta_weight, official_qr


def trained_like(out_f, in_f, seed=0, decay=0.6):
    """A weight with a decaying spectrum, as trained layers have (random Gaussians do not)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
    s = (torch.arange(1, k + 1, dtype=torch.float32) ** -decay) * (1 + 0.05 * torch.rand(k, generator=g))
    return (u * s) @ v.T


SHAPES = [(96, 96), (64, 160), (200, 48)]  # square, wide (out < in), tall (out > in)


@pytest.mark.parametrize("shape", SHAPES)
def test_orthonormal_with_positive_r_diagonal(shape):
    w = trained_like(*shape)
    r = 16
    q = canonical_basis(w, r)
    assert q.shape == (shape[0], r)
    assert torch.allclose(q.T @ q, torch.eye(r), atol=1e-5)
    # R = Qᵀ·W_core restricted to the first r columns is upper triangular with a positive diagonal
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    core = (u[:, :r] * s[:r]) @ vh[:r]
    rr = q.double().T @ core[:, :r]
    assert torch.all(torch.diagonal(rr) > 0)
    assert torch.allclose(torch.tril(rr, -1), torch.zeros_like(rr), atol=1e-5)
    # Q spans the top-r left singular subspace: projecting the core onto Q loses nothing
    assert torch.allclose(q.double() @ (q.double().T @ core), core, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_and_float64_agree(shape):
    w = trained_like(*shape, seed=1)
    q32 = canonical_basis(w, 16, torch.float32)
    q64 = canonical_basis(w, 16, torch.float64)
    assert (q32.double() - q64).abs().max() < 1e-4


def test_batched_in_any_order_equals_one_at_a_time():
    ws = torch.stack([trained_like(80, 120, seed=s) for s in range(5)])
    single = torch.stack([canonical_basis(w, 8) for w in ws])
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = canonical_basis(ws[perm], 8)
    assert torch.allclose(shuffled, single[perm], atol=1e-6)


def test_lower_precision_copies_move_delta_w_as_design_says():
    """fp16 moves ΔW by well under 0.2 %, bf16 by about 1 %, both far below a sign flip."""
    w = trained_like(256, 256, seed=2)
    r = 32
    delta_r = torch.randn(r, 256, generator=torch.Generator().manual_seed(3))
    exact = delta_weight(canonical_basis(w.double(), r, torch.float64), delta_r.double(), 1.0)

    def moved(dtype):
        q = canonical_basis(w.to(dtype), r)
        return float((delta_weight(q, delta_r, 1.0).double() - exact).norm() / exact.norm())

    fp16, bf16 = moved(torch.float16), moved(torch.bfloat16)
    assert fp16 < 2e-3
    assert bf16 < 3e-2
    assert fp16 < bf16


@pytest.mark.parametrize("shape", SHAPES)
def test_delta_w_equals_official_maths_up_to_column_signs(shape):
    w = trained_like(*shape, seed=4)
    r = 12
    q_off, _ = official_qr(w.double(), r)
    q = canonical_basis(w, r, torch.float64)
    signs = torch.sign(torch.diagonal(q.T @ q_off))
    assert torch.allclose(q_off, q * signs, atol=1e-5)
    dr_off = torch.randn(r, shape[1], dtype=torch.float64)
    # the same ΔW, once the official ΔR's rows carry the column signs
    ours = delta_weight(q, signs[:, None] * dr_off, 1.0, mask="triu")
    theirs = official_delta_weight(q_off, dr_off, 1.0, triu=True)
    assert (ours - theirs).abs().max() < 1e-5


def test_official_r_is_what_the_canonical_route_implies():
    """Thin QR of the core's first r columns = first r columns of the full QR (reference §1.1)."""
    w = trained_like(64, 96, seed=5)
    q_off, r_off = official_qr(w.double(), 10)
    signs = torch.sign(torch.diagonal(r_off[:, :10]))
    assert torch.all(torch.diagonal(r_off[:, :10]) * signs > 0)
    assert torch.allclose(canonical_basis(w, 10, torch.float64), q_off * signs, atol=1e-8)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank 65 must be in 1..64"):
        canonical_basis(torch.randn(64, 80), 65)
    w = torch.randn(32, 32)
    w[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        canonical_basis(w, 4)
    with pytest.raises(ValueError, match="linearly dependent"):
        z = torch.randn(32, 32)
        z[:, :4] = 0  # the core's first columns are zero: no unique QR
        canonical_basis(z, 4)
    with pytest.raises(ValueError, match="unknown mask"):
        apply_mask(torch.ones(2, 3), "lower")


def test_mask_and_parameter_count():
    dr = torch.ones(4, 10)
    assert int(apply_mask(dr, "triu").sum()) == 40 - 6
    assert masked_parameter_count(4, 10, "triu") == 34
    assert masked_parameter_count(64, 3072, "triu") == 64 * 3072 - 2016  # reference §1.2


def test_sketch_measures_basis_disagreement():
    w = trained_like(128, 128, seed=6)
    q = canonical_basis(w, 16)
    assert sketch_disagreement(basis_sketch(q), basis_sketch(q)) == 0.0
    flipped = q.clone()
    flipped[:, 5] *= -1
    assert sketch_disagreement(basis_sketch(q), basis_sketch(flipped)) > 0.1
    q16 = canonical_basis(w.half(), 16)
    true = float((q16 - q).norm() / q.norm())
    est = sketch_disagreement(basis_sketch(q), basis_sketch(q16))
    assert 0.2 * true < est < 5 * true


@pytest.mark.parametrize("shape", SHAPES)
def test_scipy_subset_route_equals_torch_eigh_route(shape, monkeypatch):
    """With SciPy the CPU uses syrk + syevr; without it, matmul + torch.linalg.eigh. Same Q."""
    import sys

    pytest.importorskip("scipy")
    w = trained_like(*shape, seed=7)
    with_scipy = canonical_basis(w, 8)
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)  # makes `from scipy.linalg import ...` fail
    without = canonical_basis(w, 8)
    assert (with_scipy - without).abs().max() < 1e-5
    batch = canonical_basis(torch.stack([w, w.flip(0)]), 8)
    assert torch.allclose(batch[0], without, atol=1e-5)


def near_degenerate(out_f, in_f, rank, gap, seed=0):
    """A trained-like weight whose σ_r / σ_r+1 = 1 + gap: the subspace float32 cannot resolve."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -0.6
    s[rank] = s[rank - 1] / (1 + gap)
    return ((u * s.sort(descending=True).values) @ v.T).float()


@pytest.mark.parametrize("gap", [1e-4, 1e-5, 1e-6])
def test_routes_agree_on_near_degenerate_spectra(gap, monkeypatch):
    """SciPy syevr, torch eigh and float64 give one Q (to ROUTE_TOLERANCE) even when σ_r ≈ σ_r+1;
    in float32 alone they differed by 5-30 % here."""
    import sys

    from qrlora.qr import ROUTE_TOLERANCE

    pytest.importorskip("scipy")
    w = near_degenerate(320, 320, 16, gap)
    exact = canonical_basis(w.double(), 16, torch.float64)
    with_scipy = canonical_basis(w, 16)
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    with_eigh = canonical_basis(w, 16)
    for q in (with_scipy, with_eigh):
        assert float((q.double() - exact).norm() / exact.norm()) < ROUTE_TOLERANCE
    assert float((with_scipy - with_eigh).norm() / with_eigh.norm()) < ROUTE_TOLERANCE


def test_only_unresolvable_matrices_are_recomputed_in_float64():
    easy, hard = trained_like(96, 96, seed=8), near_degenerate(96, 96, 8, 1e-6)
    alone = canonical_basis(easy, 8)
    both = canonical_basis(torch.stack([easy, hard]), 8)
    assert torch.allclose(both[0], alone, atol=1e-6)  # still the float32 result
    assert float((both[1].double() - canonical_basis(hard.double(), 8, torch.float64)).norm()) < 1e-6


def test_exactly_degenerate_spectrum_has_no_basis():
    g = torch.Generator().manual_seed(9)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    s = torch.linspace(2, 1, 64, dtype=torch.float64)
    s[4:8] = s[4]  # σ_5 = … = σ_8: no unique top-6 subspace
    w = (u * s) @ v.T
    with pytest.raises(ValueError, match="not unique"):
        canonical_basis(w, 6, torch.float64)


def test_tf32_is_off_while_computing_and_restored_after(monkeypatch):
    from qrlora import qr

    seen = []
    real = qr._canonical

    def spy(w, rank):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32))
        return real(w, rank)

    monkeypatch.setattr(qr, "_canonical", spy)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what WebUIs set for speed
    try:
        canonical_basis(trained_like(32, 32), 4)
        assert seen == [("highest", False)]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("noise", [0.0, 1e-4])
def test_columns_dependent_only_in_float32_are_resolved_in_float64(noise):
    """A trained 32×64 lab layer had its rank-4 core's first 4 columns dependent at float32's
    resolution (cond(R) ≈ 1e6): float32 refused it (noise 0 here) or, a little better
    conditioned, returned a Q 1.3e-3 off (noise 1e-4). float64 resolves both, so the basis
    exists and is float64's."""
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=torch.float64))
    r1, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    r2, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    top = r1 @ torch.diag(torch.tensor([0.5, 0.5, 0.5, 1e-6], dtype=torch.float64)) @ r2  # V's first 4 rows
    n0, _ = torch.linalg.qr(torch.randn(60, 4, generator=g, dtype=torch.float64))
    ev, evec = torch.linalg.eigh(torch.eye(4, dtype=torch.float64) - top.T @ top)
    rest = n0 @ (evec @ torch.diag(ev.clamp_min(0).sqrt()) @ evec.T)
    v = torch.cat([top, rest])  # 64×4, orthonormal columns
    w = u @ torch.diag(torch.tensor([10.0, 8.0, 6.0, 4.0], dtype=torch.float64)) @ v.T
    w = w + noise * torch.randn(32, 64, generator=g, dtype=torch.float64)
    expected = canonical_basis(w, 4, torch.float64)
    got = canonical_basis(w.float(), 4)
    assert got.dtype == torch.float32
    assert (got.double() - expected).norm() / expected.norm() < 1e-4
