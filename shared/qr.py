"""The QR-LoRA maths, in one place.

For a linear weight W (out × in) and rank r:
  W_core = U_r·diag(S_r)·V_rᵀ          (best rank-r approximation)
  Q      = first r columns of the Q factor of W_core, with R's diagonal made positive
  ΔW     = s·Q·(ΔR ⊙ M),  s = alpha / r,  M = optional upper-triangular mask

Q only depends on the top-r left singular subspace and on W's first r columns:
W_core[:, :r] = P·W[:, :r] with P = U_r·U_rᵀ the projector onto that subspace, and the thin
QR of that out × r matrix gives exactly the first r columns of the full QR of W_core. We get
P from an eigendecomposition of the smaller Gram matrix (W·Wᵀ or Wᵀ·W), which is exact
(no randomisation) and several times cheaper than a full SVD; the result does not depend on
the eigenvectors' arbitrary signs. Positive diag(R) makes Q unique: the same on every
device and library, which is what lets a ΔR file be applied anywhere.
"""

from __future__ import annotations

import contextlib
import math

import torch

MASKS = ("triu", "none")

# Number of sketch probes per layer (see ``basis_sketch``).
SKETCH_PROBES = 2


# Float32 is exact enough for the canonical Q unless σ_r and σ_r+1 nearly coincide (or the core's
# first r columns are nearly dependent): then the computed subspace depends on rounding, and the
# CPU (SciPy syevr or torch eigh) and CUDA routes disagree by up to ~30 %. ``route_sensitivity``
# estimates that error from the eigenvalues; above FLOAT32_LIMIT a matrix is recomputed in
# float64, where every route agrees; above it even in float64 there is no unique basis.
# Measured (docs/formats.md): with the limit at 1e-3 the routes agree to ROUTE_TOLERANCE.
FLOAT32_LIMIT = 1e-3
ROUTE_TOLERANCE = 1e-4  # ‖Q_route1 − Q_route2‖_F / ‖Q‖_F promised for any two routes


def canonical_basis(weight: torch.Tensor, rank: int, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Canonical Q (… × out × r) of a weight (… × out × in), batched over leading dims.

    Any float input dtype; the maths runs in ``compute_dtype`` (float32 or float64) on the
    weight's device, and Q is returned in ``compute_dtype``. Matrices whose float32 result
    would depend on the route (``route_sensitivity`` above ``FLOAT32_LIMIT``) are recomputed
    in float64, so every device and library gives the same Q to ``ROUTE_TOLERANCE``.
    """
    if weight.dim() < 2:
        raise ValueError(f"a weight must be at least 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape[-2:]
    if not 0 < rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} must be in 1..{min(out_f, in_f)} for a {out_f}×{in_f} weight")
    w = weight.detach().to(compute_dtype)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or Inf")
    with full_precision_matmul():
        q, sensitivity = _canonical(w, rank)
    unsure = sensitivity > FLOAT32_LIMIT
    if compute_dtype == torch.float64:
        if bool(unsure.any()):
            raise ValueError(f"σ_{rank} and σ_{rank + 1} coincide (or the core's first {rank} columns are nearly "
                             f"dependent) even in float64: the rank-{rank} basis is not unique; use another rank")
        return q
    if bool(unsure.any()):
        flat_q, flat_w = q.reshape(-1, out_f, rank).clone(), w.reshape(-1, out_f, in_f)
        for i in torch.nonzero(unsure.reshape(-1)).flatten().tolist():
            flat_q[i] = canonical_basis(flat_w[i].double(), rank, torch.float64).to(compute_dtype)
        q = flat_q.reshape(q.shape)
    return q


def _canonical(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, route sensitivity per matrix) in w's dtype."""
    out_f, in_f = w.shape[-2:]
    left = out_f <= in_f
    n = out_f if left else in_f
    values, vectors = gram_top_eigenpairs(w, min(rank + 1, n), left)
    vectors = vectors[..., -rank:]
    if left:
        # Top-r eigenvectors of W·Wᵀ span the left singular subspace; project W's first r columns.
        first_cols = vectors @ (vectors.mT @ w[..., :rank])
    else:
        # Top-r eigenvectors V of Wᵀ·W: W_core = W·V·Vᵀ, so W_core[:, :r] = (W·V)·(V[:r, :])ᵀ.
        first_cols = (w @ vectors) @ vectors[..., :rank, :].mT
    q, r = torch.linalg.qr(first_cols, mode="reduced")
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    smallest = diag.abs().amin(dim=-1)
    scale = diag.abs().amax(dim=-1).clamp_min(torch.finfo(w.dtype).tiny)
    dependent = smallest <= scale * torch.finfo(w.dtype).eps * max(out_f, in_f)
    if bool(dependent.any()) and w.dtype == torch.float64:
        # The first r columns of the rank-r core are linearly dependent even in float64: QR has
        # no unique answer; say so instead of returning noise.
        raise ValueError(f"the rank-{rank} core's first {rank} columns are linearly dependent; no canonical basis")
    signs = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    # cond(R) measured in the working precision understates a nearly singular R (its rounding
    # props up the smallest diagonal), and the QR of an out-long column amplifies by up to
    # √out more: a 32×64 layer with cond(R) read as 3e3 was off by 1.3e-3 in float32.
    r_condition = scale / smallest.clamp_min(torch.finfo(w.dtype).tiny) * math.sqrt(out_f)
    sensitivity = route_sensitivity(values, rank, n, r_condition)
    # Dependent in this precision only (a trained 32×64 layer had them at cond(R) ≈ 1e6, which
    # float32 cannot resolve and float64 does): infinitely sensitive, so it is recomputed in float64.
    return q * signs.unsqueeze(-2), torch.where(dependent, torch.full_like(sensitivity, float("inf")), sensitivity)


def route_sensitivity(values: torch.Tensor, rank: int, n: int, r_condition: torch.Tensor) -> torch.Tensor:
    """Estimated relative error of Q from rounding alone: unit roundoff × the larger of
    λ_1 / (λ_r − λ_r+1) (how much the top-r subspace of the Gram matrix moves per unit of
    rounding) and cond(R) (how much the QR step amplifies it). ``values``: the top
    eigenvalues, ascending (λ_r+1 first when rank < n)."""
    unit = torch.finfo(values.dtype).eps / 2
    if rank >= n:  # the subspace is everything: no gap to resolve
        return unit * r_condition.to(values.dtype)
    gap = (values[..., 1] - values[..., 0]).clamp_min(torch.finfo(values.dtype).tiny)
    return unit * torch.maximum(values[..., -1].abs() / gap, r_condition.to(values.dtype))


@contextlib.contextmanager
def full_precision_matmul():
    """Float32 matmuls in full float32 while computing a basis: WebUIs turn TF32 on globally,
    which rounds products to 10 mantissa bits on CUDA and would make the GPU's Q differ from
    the CPU's."""
    old_precision = torch.get_float32_matmul_precision()
    old_cuda = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cuda.matmul.allow_tf32 = old_cuda
        torch.backends.cudnn.allow_tf32 = old_cudnn


def gram_top_eigenpairs(w: torch.Tensor, count: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest eigenvalues (ascending) and their eigenvectors of W·Wᵀ (``left``)
    or Wᵀ·W, batched.

    On the CPU with SciPy installed, BLAS syrk forms the Gram matrix (half the flops of a
    matmul) and LAPACK's subset solver syevr computes only the wanted vectors after the
    tridiagonal reduction: 2-3× faster than matmul + ``torch.linalg.eigh`` at SDXL sizes.
    The routes differ by rounding only; ``canonical_basis`` makes that difference smaller
    than ``ROUTE_TOLERANCE`` (float64 where float32 cannot resolve the subspace).
    """
    n = w.shape[-2] if left else w.shape[-1]
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64) and count < n // 2:
        try:
            from scipy.linalg import blas, eigh
        except ImportError:
            blas = None
        if blas is not None:
            syrk = blas.ssyrk if w.dtype == torch.float32 else blas.dsyrk
            values, vecs = [], []
            for m in w.reshape(-1, *w.shape[-2:]):
                at = m.numpy().T  # Fortran-ordered view of W: no copy
                gram = syrk(1.0, at, trans=1 if left else 0)  # upper triangle of W·Wᵀ or Wᵀ·W
                lam, v = eigh(gram, lower=False, subset_by_index=[n - count, n - 1], driver="evr",
                              overwrite_a=True, check_finite=False)
                values.append(torch.from_numpy(lam))
                vecs.append(torch.from_numpy(v))
            return (torch.stack(values).reshape(*w.shape[:-2], count).to(w.dtype),
                    torch.stack(vecs).reshape(*w.shape[:-2], n, count).to(w.dtype))
    gram = w @ w.mT if left else w.mT @ w
    values, vectors = torch.linalg.eigh(gram)
    return values[..., -count:], vectors[..., -count:]


def apply_mask(delta_r: torch.Tensor, mask: str) -> torch.Tensor:
    """ΔR ⊙ M. ``triu`` keeps the upper triangle of the r × in matrix (official default)."""
    if mask == "triu":
        return torch.triu(delta_r)
    if mask == "none":
        return delta_r
    raise ValueError(f"unknown mask {mask!r}; expected one of {', '.join(MASKS)}")


def delta_weight(q: torch.Tensor, delta_r: torch.Tensor, scale: float, mask: str = "none") -> torch.Tensor:
    """ΔW = s·Q·(ΔR ⊙ M), in the wider of the two input dtypes."""
    dtype = torch.promote_types(q.dtype, delta_r.dtype)
    return (q.to(dtype) @ apply_mask(delta_r.to(dtype), mask)) * scale


def masked_parameter_count(rank: int, in_features: int, mask: str) -> int:
    """Trainable entries of one ΔR."""
    full = rank * in_features
    if mask == "triu":
        k = min(rank, in_features)
        return full - k * (k - 1) // 2
    return full


# ----------------------------------------------------------------- basis sketch
def _probe(out_features: int, probes: int = SKETCH_PROBES) -> torch.Tensor:
    """A fixed ±1 matrix (out × probes) from an integer hash: identical on every machine and
    torch version (no RNG involved)."""
    mask32 = 0xFFFFFFFF
    h = torch.arange(out_features * probes, dtype=torch.int64) + 0x9E3779B9
    # murmur3's finaliser; products stay below 2**64 and are reduced to 32 bits each step
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask32
    h = h ^ (h >> 16)
    signs = ((h >> 7) & 1).to(torch.float32) * 2 - 1
    return signs.view(out_features, probes)


def basis_sketch(q: torch.Tensor) -> torch.Tensor:
    """A small fingerprint of Q (probes × r): Gᵀ·Q for the fixed ±1 probe matrix G.

    ‖sketch(Q′) − sketch(Q)‖ / ‖sketch(Q)‖ estimates ‖Q′ − Q‖_F / ‖Q‖_F, which is the relative
    change of an applied ΔW when ΔR is applied with Q′ instead of Q. A column sign flip, a
    different subspace or a different precision all show up.
    """
    g = _probe(q.shape[-2]).to(device=q.device)
    return (g.mT @ q.to(torch.float32)).cpu()


def sketch_disagreement(expected: torch.Tensor, candidate: torch.Tensor) -> float:
    """Relative distance of two sketches of the same layer (0 = same basis)."""
    expected = expected.to(torch.float32)
    denom = float(expected.norm()) or 1.0
    return float((candidate.to(torch.float32) - expected).norm()) / denom
