"""Fusing ΔR files: ΔR_fused = Σ λᵢ·(sᵢ/s)·ΔRᵢ, exact because every file shares Q."""

from __future__ import annotations

from typing import Sequence

import torch

from .deltar import DeltaR
from .errors import UserError


class IncompatibleFiles(UserError):
    pass


def check_compatible(items: Sequence[tuple[str, DeltaR]]) -> None:
    """Refuse to fuse files that do not share a basis, mask or architecture; name both files."""
    first_name, first = items[0]
    for name, d in items[1:]:
        for what, a, b in (
            ("architecture", first.arch, d.arch),
            ("basis", first.basis_id, d.basis_id),
            ("mask", first.mask, d.mask),
        ):
            if a != b:
                raise IncompatibleFiles(
                    f"cannot fuse {first_name} and {name}: different {what} ({a} vs {b}); "
                    "ΔR files only add up when trained on the same basis"
                )


def fuse(items: Sequence[tuple[str, DeltaR, float]]) -> DeltaR:
    """items: (label for messages, ΔR file, λ). The result keeps the first file's alpha."""
    if not items:
        raise ValueError("nothing to fuse")
    check_compatible([(n, d) for n, d, _ in items])
    base = items[0][1]
    layers: dict[str, torch.Tensor] = {}
    targets = {}
    for _, d, lam in items:
        factor = float(lam) * d.scale / base.scale
        for name, dr in d.layers.items():
            if name in layers:
                layers[name] = layers[name] + factor * dr
            else:
                layers[name] = factor * dr
                targets[name] = d.targets[name]
    q = base.q if all(d.q for _, d, _ in items) else None
    return DeltaR(base.arch, base.rank, base.alpha, base.mask, layers, targets, base.basis_id,
                  base.sketch, q, {})
