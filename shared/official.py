"""Importing files written by the official QR-LoRA code.

The official trainer saves, per layer, ``{prefix}.{diffusers name}.lora.q.weight`` (out × r),
``.lora.delta_r.weight`` (r × in) and ``.lora.base_r.weight`` (r × in), with prefix
``transformer`` (FLUX) or ``unet`` (SDXL), and no metadata. Its Q has arbitrary column signs
and was computed from bf16 weights on a GPU. We re-express each layer in our canonical basis:
ΔR_ours = (Q_oursᵀ·Q_official)·ΔR_official, which is exactly ΔR with some rows negated when
the two Qs span the same subspace (the normal case), and otherwise the closest ΔW our basis
can represent. Every layer's change of ΔW is measured and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .basis import Basis
from .checkpoint import FileFormatError, SafetensorsFile
from .deltar import DeltaR, from_basis

SUFFIX_Q, SUFFIX_DR, SUFFIX_BASE = ".lora.q.weight", ".lora.delta_r.weight", ".lora.base_r.weight"
ARCH_OF_PREFIX = {"transformer": "flux", "unet": "sdxl"}


@dataclass
class LayerReport:
    name: str
    q_error: float  # ‖Q_official − Q_ours·D‖ / ‖Q_ours‖ after the best column-sign alignment D
    dw_error: float  # relative change of ΔW caused by the import
    flipped: int  # columns whose sign differs


@dataclass
class ImportReport:
    layers: list[LayerReport] = field(default_factory=list)
    mask: str = "triu"
    tolerance: float = 0.02

    @property
    def mismatched(self) -> list[LayerReport]:
        return [x for x in self.layers if x.q_error > self.tolerance]

    def summary(self) -> str:
        worst_dw = max((x.dw_error for x in self.layers), default=0.0)
        worst_q = max((x.q_error for x in self.layers), default=0.0)
        text = (
            f"{len(self.layers)} layers imported, mask {self.mask}; ΔW changed by {worst_dw:.3%} at most; "
            f"stored Q differs from the base's by {worst_q:.3%} at most"
        )
        if self.mismatched:
            names = ", ".join(x.name for x in self.mismatched[:5])
            text += f"; {len(self.mismatched)} layers' stored Q does not match the base (> {self.tolerance:.0%}): {names}"
        return text


def read_official(path: str) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(architecture, {layer name: {"q", "delta_r", "base_r"}})."""
    f = SafetensorsFile(path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key in f.keys:
        for part, suffix in (("q", SUFFIX_Q), ("delta_r", SUFFIX_DR), ("base_r", SUFFIX_BASE)):
            if key.endswith(suffix):
                layers.setdefault(key[: -len(suffix)], {})[part] = f.tensor(key).to(torch.float32)
    if not layers:
        raise FileFormatError(f"{path}: no '*{SUFFIX_DR}' keys: not an official QR-LoRA ΔR file")
    prefixes = {name.split(".", 1)[0] for name in layers}
    if len(prefixes) != 1 or next(iter(prefixes)) not in ARCH_OF_PREFIX:
        raise FileFormatError(f"{path}: layer prefixes {sorted(prefixes)}; expected all 'transformer.' (FLUX) or 'unet.' (SDXL)")
    for name, parts in layers.items():
        for need in ("q", "delta_r"):
            if need not in parts:
                raise FileFormatError(f"{path}: layer {name} has no {need} tensor")
            if not bool(torch.isfinite(parts[need]).all()):
                raise FileFormatError(f"{path}: {name} {need} contains NaN or Inf")
    return ARCH_OF_PREFIX[prefixes.pop()], layers


def import_official(path: str, basis: Basis, tolerance: float = 0.02) -> tuple[DeltaR, ImportReport]:
    arch, layers = read_official(path)
    if arch != basis.arch:
        raise FileFormatError(f"{path}: is a {arch} file but the basis is for {basis.arch}")
    shapes = {t.name: t.shape for t in basis.targets}
    outside = [n for n in layers if n not in shapes]
    if outside:
        raise FileFormatError(f"{path}: {len(outside)} layers are not in the basis {basis.basis_id} (first: {outside[0]})")
    report = ImportReport(tolerance=tolerance)
    # The official main variant masks ΔR to its upper triangle; keep that when the data shows it.
    report.mask = "triu" if all(bool((p["delta_r"].tril(-1) == 0).all()) for p in layers.values()) else "none"
    delta_r = {}
    for name, parts in layers.items():
        q_off, dr_off = parts["q"], parts["delta_r"]
        q_ours = basis.q[name]
        if q_off.shape != q_ours.shape or dr_off.shape != (basis.rank, shapes[name][1]):
            raise FileFormatError(
                f"{path}: {name}: q {tuple(q_off.shape)} / delta_r {tuple(dr_off.shape)} do not fit rank {basis.rank} "
                f"and layer shape {shapes[name]}"
            )
        overlap = q_ours.mT @ q_off  # r × r; ±I when only column signs differ
        signs = torch.where(torch.diagonal(overlap) < 0, -1.0, 1.0)
        q_error = float((q_off - q_ours * signs).norm() / q_ours.norm())
        if q_error <= tolerance:
            new = signs[:, None] * dr_off  # exact re-signing; keeps the triangular structure
        else:
            new = overlap @ dr_off  # best approximation of ΔW in our basis
        delta_r[name] = new
        before = q_off @ dr_off
        dw_error = float((q_ours @ new - before).norm() / before.norm().clamp_min(1e-30))
        report.layers.append(LayerReport(name, q_error, dw_error, int((signs < 0).sum())))
    if report.mismatched and report.mask == "triu":
        report.mask = "none"  # a rotated ΔR is no longer triangular; keep every entry
    meta = {"qrlora.imported_from": "official QR-LoRA"}
    return from_basis(basis, delta_r, alpha=float(basis.rank), mask=report.mask, metadata=meta), report
