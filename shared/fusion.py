"""Fusing ΔR files, the one implementation behind ``qrlora fuse`` and the WebUI extension.

Files trained on one basis add up exactly: ΔW = Q·Σ cᵢ·ΔRᵢ. ``qrlora fuse`` writes
Σ λᵢ·(sᵢ/s₁)·ΔRᵢ as a file with the first file's scale s₁ = alpha₁/r; the extension applies
Σ mᵢ·sᵢ·ΔRᵢ (mᵢ the tag's te or unet multiplier). Both refuse the same inputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .deltar import DeltaR
from .errors import IncompatibleFiles, UserError

__all__ = ["IncompatibleFiles", "check_fusable", "check_compatible", "weighted_sum", "fuse"]


def check_fusable(label: str, d: DeltaR) -> None:
    """A file that cannot take part in a fusion on its own account."""
    if d.alpha == 0:
        raise IncompatibleFiles(f"{label} has alpha 0, so it changes nothing; retrain or rewrite it with a nonzero alpha")


def check_compatible(items: Sequence[tuple[str, DeltaR]]) -> None:
    """Refuse files that do not share an architecture, basis and mask; the message names
    both files and both values."""
    first_label, first = items[0]
    for label, d in items:
        check_fusable(label, d)
    for label, d in items[1:]:
        for what, a, b in (
            ("architecture", first.arch, d.arch),
            ("basis", first.basis_id, d.basis_id),
            ("mask", first.mask, d.mask),
        ):
            if a != b:
                raise IncompatibleFiles(
                    f"cannot fuse {first_label} and {label}: different {what} ({a} vs {b}); "
                    "ΔR files only add up when trained on the same basis with the same mask"
                )


def weighted_sum(terms: Sequence[tuple[DeltaR, Callable[[str], float]]]) -> dict[str, torch.Tensor]:
    """Σ c(layer)·ΔR per layer over every layer of any file, in first-seen order (float32).
    A layer whose terms all have c = 0 sums to zeros."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for d, coefficient in terms:
            for name, dr in d.layers.items():
                c = float(coefficient(name))
                total = out.get(name)
                if total is None:
                    out[name] = total = torch.zeros(dr.shape, dtype=torch.float32)
                if c != 0.0:
                    total.add_(dr.to(torch.float32), alpha=c)
    return out


def fuse(items: Sequence[tuple[str, DeltaR, float]]) -> DeltaR:
    """items: (label for messages, ΔR file, λ). The result keeps the first file's alpha."""
    if not items:
        raise UserError("nothing to fuse: give at least one ΔR file")
    check_compatible([(label, d) for label, d, _ in items])
    base = items[0][1]
    layers = weighted_sum([(d, lambda _, f=float(lam) * d.scale / base.scale: f) for _, d, lam in items])
    targets = {}
    for _, d, _ in items:
        for name in d.layers:
            targets.setdefault(name, d.targets[name])
    q = base.q if all(d.q for _, d, _ in items) else None
    return DeltaR(base.arch, base.rank, base.alpha, base.mask, layers, targets, base.basis_id, base.sketch, q,
                  _carried_metadata([d for _, d, _ in items]))


def _carried_metadata(files: Sequence[DeltaR]) -> dict[str, str]:
    """What the fused file says about its base model: the inputs' ``ss_sd_model_name`` (and
    hash) when they agree, since they share a basis and so a base model."""
    out = {}
    for key in ("ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash"):
        values = {d.metadata.get(key, "") for d in files} - {""}
        if len(values) == 1:
            out[key] = values.pop()
    return out
