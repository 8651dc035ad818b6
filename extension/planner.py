"""From resolved tags to what gets applied: files grouped by basis, fused per layer.

For the files of one basis, every layer gets one ΔR: ``Σᵢ mᵢ·wᵢ(block)·sᵢ·ΔRᵢ`` (mᵢ = the
tag's te or unet multiplier, wᵢ(block) its ``lbw=`` weight for the layer's block, 1 without
``lbw=``, sᵢ = alphaᵢ/r; summed by ``qrlora.fusion``, as ``qrlora fuse`` does), so the host
applies ``W + Q·ΔR_fused`` once, whatever the number of files. Files that do not fuse (another basis or mask) form separate groups, applied
one after another.
Loaded files and fused groups are cached, so changing λ re-fuses small r × in tensors and
never touches a basis. Tags with step windows (``start=``/``stop=``) give one fused group per
window change (``windows``), all fused when the prompt is activated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from . import core, keymap


@dataclass
class Member:
    label: str  # the name as written in the prompt
    path: str
    mtime_ns: int
    size: int
    deltar: object  # shared.deltar.DeltaR
    te: float
    unet: float
    blocks: object = None  # blocks.BlockWeights of the tag's lbw=, or None (every block 1)
    start: int | None = None  # the tag's step window (start= / stop=): None = from the first step
    stop: int | None = None  # None = to the last step

    def active_at(self, step: int) -> bool:
        return (self.start is None or self.start <= step) and (self.stop is None or step < self.stop)

    def coefficient(self, layer: str) -> float:
        m = self.te if keymap.is_text_encoder(layer) else self.unet
        if self.blocks is not None:
            m *= self.blocks.for_key(self.deltar.targets[layer].key)
        return m * self.deltar.scale

    def identity_data(self) -> list:
        weights = None if self.blocks is None else [repr(float(v)) for v in self.blocks.values]
        return [os.path.realpath(self.path), self.mtime_ns, self.size, repr(float(self.te)), repr(float(self.unet)),
                weights]


@dataclass
class FusedLayer:
    target: object  # shared.archs.Target
    q: torch.Tensor  # out × r, float32
    delta: torch.Tensor  # r × in, float32; s and λ included: ΔW = q @ delta


@dataclass
class FusedGroup:
    basis_id: str
    mask: str
    arch: str
    labels: list[str]
    layers: dict[str, FusedLayer]
    identity: str  # changes whenever a file, its contents or a multiplier changes
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return "+".join(self.labels)


class FileCache:
    """Loaded ΔR files by path, reloaded when the file's mtime or size changes."""

    def __init__(self):
        self._files: dict[str, tuple[int, int, object]] = {}
        self.loads = 0

    def load(self, path: str, expect_arch: str | None):
        st = os.stat(path)
        hit = self._files.get(path)
        if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
            d = hit[2]
            if expect_arch and d.arch != expect_arch:
                raise core.FileFormatError(f"{path}: trained for {d.arch}, but the loaded model is {expect_arch}")
            return d, st
        d = core.deltar.load(path, expect_arch=expect_arch)
        self.loads += 1
        self._files[path] = (st.st_mtime_ns, st.st_size, d)
        return d, st

    def keep_only(self, paths) -> None:
        keep = set(paths)
        for p in [p for p in self._files if p not in keep]:
            del self._files[p]


def windows(members: list[Member]) -> list[tuple[int, list[Member]]]:
    """The members as they apply from each step on where a window opens or closes:
    ``[(first step, members)]``, from step 0, one entry per change. A member outside its window
    keeps its text-encoder multiplier (the prompt is encoded once, before the first step) and
    gets UNet multiplier 0, so every entry still fuses to one Σ per layer, and the sum over the
    active members is bit-identical to fusing them alone (adding 0·ΔR changes nothing)."""
    bounds = sorted({0} | {m.start for m in members if m.start is not None}
                    | {m.stop for m in members if m.stop is not None})
    out: list[tuple[int, list[Member]]] = []
    previous = None
    for step in bounds:
        active = tuple(m.active_at(step) for m in members)
        if active != previous:
            out.append((step, [m if on else replace(m, unet=0.0) for m, on in zip(members, active)]))
            previous = active
    return out


def identity(basis_id: str, members: list[Member]) -> str:
    data = [basis_id] + [m.identity_data() for m in members]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:12]


class Fuser:
    """Fused groups by identity (a small LRU: the first pass's and the hires pass's)."""

    def __init__(self, keep: int = 2):
        # ``keep`` is raised by the engine to hold every group of the last two plans (a prompt
        # with step windows has one group per window change)
        self._groups: OrderedDict[str, FusedGroup] = OrderedDict()
        self.keep = keep
        self.fusions = 0

    def fuse(self, members: list[Member], q: dict[str, torch.Tensor]) -> FusedGroup:
        ident = identity(f"{members[0].deltar.basis_id}/{members[0].deltar.mask}", members)
        cached = self._groups.get(ident)
        if cached is not None:
            self._groups.move_to_end(ident)
            return cached
        group = fuse(members, q, ident)
        self.fusions += 1
        self._groups[ident] = group
        while len(self._groups) > self.keep:
            self._groups.popitem(last=False)
        return group


def fuse(members: list[Member], q: dict[str, torch.Tensor], ident: str) -> FusedGroup:
    """The members' ΔR summed per layer by the core's fusion (same refusals as ``qrlora
    fuse``); layers that sum to zero (untrained, or λ = 0) are left out."""
    first = members[0].deltar
    core.fusion.check_compatible([(f"<qrlora:{m.label}>", m.deltar) for m in members])
    sums = core.fusion.weighted_sum([(m.deltar, m.coefficient) for m in members])
    layers: dict[str, FusedLayer] = {}
    for name, total in sums.items():
        if bool(total.any()):
            target = next(m.deltar.targets[name] for m in members if name in m.deltar.targets)
            layers[name] = FusedLayer(target, q[name], total)
    return FusedGroup(first.basis_id, first.mask, first.arch, [m.label for m in members], layers, ident)
