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
device and library, which is what lets a ΔR file be applied anywhere (DESIGN §3).
"""

from __future__ import annotations

import torch

MASKS = ("triu", "none")

# Number of sketch probes per layer (see ``basis_sketch``).
SKETCH_PROBES = 2


def canonical_basis(weight: torch.Tensor, rank: int, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Canonical Q (… × out × r) of a weight (… × out × in), batched over leading dims.

    Any float input dtype; the maths runs in ``compute_dtype`` (float32 or float64) on the
    weight's device, and Q is returned in ``compute_dtype``.
    """
    if weight.dim() < 2:
        raise ValueError(f"a weight must be at least 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape[-2:]
    if not 0 < rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} must be in 1..{min(out_f, in_f)} for a {out_f}×{in_f} weight")
    w = weight.detach().to(compute_dtype)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or Inf")
    if out_f <= in_f:
        # Top-r eigenvectors of W·Wᵀ span the left singular subspace; project W's first r columns.
        u = gram_top_eigenvectors(w, rank, left=True)
        first_cols = u @ (u.mT @ w[..., :rank])
    else:
        # Top-r eigenvectors V of Wᵀ·W: W_core = W·V·Vᵀ, so W_core[:, :r] = (W·V)·(V[:r, :])ᵀ.
        v = gram_top_eigenvectors(w, rank, left=False)
        first_cols = (w @ v) @ v[..., :rank, :].mT
    q, r = torch.linalg.qr(first_cols, mode="reduced")
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    smallest = diag.abs().amin(dim=-1)
    scale = diag.abs().amax(dim=-1).clamp_min(torch.finfo(compute_dtype).tiny)
    if bool((smallest <= scale * torch.finfo(compute_dtype).eps * max(out_f, in_f)).any()):
        # The first r columns of the rank-r core are linearly dependent: QR has no unique
        # answer. Never happens for trained weights; say so instead of returning noise.
        raise ValueError(f"the rank-{rank} core's first {rank} columns are linearly dependent; no canonical basis")
    signs = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    return q * signs.unsqueeze(-2)


def gram_top_eigenvectors(w: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """Eigenvectors of the ``rank`` largest eigenvalues of W·Wᵀ (``left``) or Wᵀ·W, batched.

    On the CPU with SciPy installed, BLAS syrk forms the Gram matrix (half the flops of a
    matmul) and LAPACK's subset solver syevr computes only the wanted vectors after the
    tridiagonal reduction: 2-3× faster than matmul + ``torch.linalg.eigh`` at SDXL sizes.
    Both routes are exact; which one ran changes Q only by float rounding, and the basis id
    does not depend on it.
    """
    n = w.shape[-2] if left else w.shape[-1]
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64) and rank < n // 2:
        try:
            from scipy.linalg import blas, eigh
        except ImportError:
            blas = None
        if blas is not None:
            syrk = blas.ssyrk if w.dtype == torch.float32 else blas.dsyrk
            vecs = []
            for m in w.reshape(-1, *w.shape[-2:]):
                at = m.numpy().T  # Fortran-ordered view of W: no copy
                gram = syrk(1.0, at, trans=1 if left else 0)  # upper triangle of W·Wᵀ or Wᵀ·W
                _, v = eigh(gram, lower=False, subset_by_index=[n - rank, n - 1], driver="evr",
                            overwrite_a=True, check_finite=False)
                vecs.append(torch.from_numpy(v))
            return torch.stack(vecs).reshape(*w.shape[:-2], n, rank).to(w.dtype)
    gram = w @ w.mT if left else w.mT @ w
    return torch.linalg.eigh(gram)[1][..., -rank:]


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
