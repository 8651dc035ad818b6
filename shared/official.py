"""Importing files written by the official QR-LoRA code.

The official trainer saves, per layer, ``{prefix}.{diffusers name}.lora.q.weight`` (out × r),
``.lora.delta_r.weight`` (r × in) and ``.lora.base_r.weight`` (r × in), with prefix
``transformer`` (FLUX) or ``unet`` (SDXL), and no metadata. Its Q has arbitrary column signs
and was computed from bf16 weights on a GPU, so it is 1-2 % away from ours. We re-express each
layer in our canonical basis by projection, ΔR_ours = (Q_oursᵀ·Q_official)·ΔR_official: the
least-squares ΔR, i.e. the ΔW closest to the official one that our basis can represent (when
only column signs differ it is exactly ΔR with those rows negated). Under the file's mask
(``triu`` when the official ΔRs are upper triangular) the best masked ΔR is the mask applied to
the projection, which is never worse than re-signing. The mask is one per file (fusion and the
WebUIs apply it per file): a layer's projection never switches it. Every layer's change of ΔW
is measured; layers that move more than the tolerance stop the import unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .basis import Basis
from .checkpoint import FileFormatError, SafetensorsFile
from .deltar import DeltaR, from_basis
from .errors import IncompatibleFiles
from .qr import apply_mask

SUFFIX_Q, SUFFIX_DR, SUFFIX_BASE = ".lora.q.weight", ".lora.delta_r.weight", ".lora.base_r.weight"
ARCH_OF_PREFIX = {"transformer": "flux", "unet": "sdxl"}


@dataclass
class LayerReport:
    name: str
    q_error: float  # ‖Q_official − Q_ours·D‖ / ‖Q_ours‖ after the best column-sign alignment D
    dw_error: float  # relative change of ΔW caused by the import
    flipped: int  # columns whose sign differs
    mask_cost: float = 0.0  # part of dw_error due to the file's mask (0 with mask "none")


@dataclass
class ImportReport:
    layers: list[LayerReport] = field(default_factory=list)
    mask: str = "triu"
    tolerance: float = 0.02

    @property
    def mismatched(self) -> list[LayerReport]:
        """Layers whose stored Q is further than the tolerance from the base's."""
        return [x for x in self.layers if x.q_error > self.tolerance]

    @property
    def moved(self) -> list[LayerReport]:
        """Layers whose ΔW the import changes by more than the tolerance."""
        return [x for x in self.layers if x.dw_error > self.tolerance]

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
        if self.moved:
            names = ", ".join(f"{x.name} ({x.dw_error:.2%})" for x in self.moved[:5])
            text += f"; ΔW moved more than {self.tolerance:.0%} in {len(self.moved)} layers: {names}"
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


def import_official(path: str, basis: Basis, tolerance: float = 0.02, force: bool = False) -> tuple[DeltaR, ImportReport]:
    """The official file as a ΔR file on ``basis``, with the least ΔW change per layer under the
    file's mask. Raises IncompatibleFiles naming the layers whose ΔW moves by more than
    ``tolerance`` (a different base model, most likely) unless ``force``."""
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
        projected = overlap @ dr_off  # least-squares: Q_ours·X closest to Q_off·ΔR
        new = apply_mask(projected, report.mask)  # the closest ΔR the mask allows
        delta_r[name] = new
        before = q_off @ dr_off
        scale = float(before.norm().clamp_min(1e-30))
        dw_error = float((q_ours @ new - before).norm()) / scale
        unmasked = float((q_ours @ projected - before).norm()) / scale
        report.layers.append(LayerReport(name, q_error, dw_error, int((signs < 0).sum()), max(0.0, dw_error - unmasked)))
    if report.moved and not force:
        names = ", ".join(f"{x.name} ({x.dw_error:.2%})" for x in report.moved[:5])
        raise IncompatibleFiles(
            f"{path}: importing onto basis {basis.basis_id} changes ΔW by more than {tolerance:.0%} in "
            f"{len(report.moved)} of {len(report.layers)} layers ({names}); the file was trained on another base "
            "model, or force the import (qrlora import-official --force)"
        )
    meta = {"qrlora.imported_from": "official QR-LoRA"}
    return from_basis(basis, delta_r, alpha=float(basis.rank), mask=report.mask, metadata=meta), report
