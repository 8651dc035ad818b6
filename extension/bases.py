"""Which Q to apply a ΔR file with (DESIGN §3), in this order:

1. the Q embedded in a portable file;
2. a basis already in memory or in the basis cache folder under the file's basis id;
3. computed from the loaded checkpoint's *file on disk* (never from in-memory weights, which
   may be patched, cast or quantized), cached by checkpoint identity and rank, then checked
   against the file's basis sketch. When the ids differ the disagreement is measured and the
   mismatch policy decides: ``warn`` (apply, say so with the figure), ``refuse`` (skip the
   file), ``apply`` (apply, console note only). Below the threshold it is applied quietly.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from . import core

POLICIES = ("warn", "refuse", "apply")


@dataclass
class Resolution:
    q: dict[str, torch.Tensor] | None  # name -> Q (out × r), float32; None when refused
    source: str  # "embedded", "memory", "cache", "computed", or "" when refused
    disagreement: float | None = None  # measured max relative difference when the ids differ
    message: str = ""  # for the user (warning or reason for refusal)

    @property
    def refused(self) -> bool:
        return self.q is None


def _covers(q: dict[str, torch.Tensor], d) -> bool:
    return all(n in q and tuple(q[n].shape) == (d.targets[n].shape[0], d.rank) for n in d.layers)


class BasisResolver:
    def __init__(self, cache_folder: Callable[[], str], device: Callable[[], str] = lambda: "auto",
                 log: Callable[[str], None] = print, status: Callable[[str], None] = lambda s: None,
                 keep: int = 3):
        self._cache_folder = cache_folder
        self._device = device
        self._log = log
        self._status = status
        self._keep = keep
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # basis id -> Q
        self._candidates: dict[tuple, str] = {}  # (checkpoint identity, rank, layers) -> basis id
        self.computations = 0  # how many bases were computed (tests check λ changes cost none)

    # ----------------------------------------------------------------- memory
    def remember(self, basis_id: str, q: dict[str, torch.Tensor]) -> None:
        self._memory[basis_id] = q
        self._memory.move_to_end(basis_id)
        while len(self._memory) > self._keep:
            self._memory.popitem(last=False)

    def _recall(self, basis_id: str) -> dict[str, torch.Tensor] | None:
        q = self._memory.get(basis_id)
        if q is not None:
            self._memory.move_to_end(basis_id)
        return q

    def _cache(self):
        folder = self._cache_folder()
        return core.basis.BasisCache(folder) if folder else None

    # ----------------------------------------------------------------- resolving
    def resolve(self, d, label: str, checkpoint: str | None, policy: str = "warn", threshold: float = 0.01) -> Resolution:
        """The Q to apply ΔR file ``d`` (labelled ``label`` in messages) with."""
        if d.q and _covers(d.q, d):
            self.remember(d.basis_id, d.q)
            return Resolution(d.q, "embedded")
        q = self._recall(d.basis_id)
        if q is not None and _covers(q, d):
            return Resolution(q, "memory")
        cache = self._cache()
        if cache is not None:
            try:
                basis = cache.get(d.basis_id)
            except (core.FileFormatError, ValueError, KeyError) as e:
                self._log(f"ignoring a broken basis file in the cache: {e}")
                basis = None
            if basis is not None and _covers(basis.q, d):
                self.remember(d.basis_id, basis.q)
                return Resolution(basis.q, "cache")
        return self._from_checkpoint(d, label, checkpoint, policy, threshold)

    def _from_checkpoint(self, d, label, checkpoint, policy, threshold) -> Resolution:
        where = f"put its basis file ({d.basis_id}.safetensors) in {self._cache_folder() or 'the basis cache folder'}"
        if not checkpoint or not os.path.isfile(checkpoint):
            return Resolution(None, "", message=f"{label}: no basis {d.basis_id} and no checkpoint file to compute it from; {where}")
        if not checkpoint.lower().endswith(".safetensors"):
            return Resolution(None, "", message=(
                f"{label}: the basis must be computed from the checkpoint, but {os.path.basename(checkpoint)} "
                f"is not a .safetensors file (pickles are never read); {where}"))
        try:
            candidate_id, q = self._candidate(d, checkpoint)
        except (core.FileFormatError, ValueError, OSError) as e:
            return Resolution(None, "", message=f"{label}: cannot compute the basis from {os.path.basename(checkpoint)}: {e}")
        if candidate_id == d.basis_id:
            return Resolution(q, "computed")
        if d.sketch is None:
            if policy == "apply":
                return Resolution(q, "computed", None, f"{label}: trained on another basis ({d.basis_id}); applied anyway (no sketch to measure it)")
            return Resolution(None, "", message=f"{label}: trained on basis {d.basis_id}, the loaded checkpoint gives {candidate_id}, and the file has no sketch to compare them; {where}")
        agree = core.basis.agreement(d.names, d.sketch, q)
        if agree.missing:
            return Resolution(None, "", message=f"{label}: {agree.describe()}")
        figure = agree.max
        text = (f"{label}: trained on basis {d.basis_id} but the loaded checkpoint gives {candidate_id}: "
                f"{agree.describe()}")
        if figure <= threshold:
            self._log(text + f" (within the {threshold:.2%} threshold)")
            return Resolution(q, "computed", figure)
        if policy == "refuse":
            return Resolution(None, "", figure, text + f"; refused (QR-LoRA setting 'on basis mismatch' = refuse); {where}")
        if policy == "apply":
            self._log(text + "; applied anyway (setting)")
            return Resolution(q, "computed", figure)
        return Resolution(q, "computed", figure, text + "; applied anyway, results may differ from training")

    def _candidate(self, d, checkpoint: str) -> tuple[str, dict[str, torch.Tensor]]:
        """Basis of the loaded checkpoint over ``d``'s layers at ``d``'s rank: memory, disk
        cache (by the checkpoint file's identity), or a one-time computation."""
        st = os.stat(checkpoint)
        names = tuple(d.names)
        key = (os.path.realpath(checkpoint), st.st_size, st.st_mtime_ns, d.rank, d.arch, names)
        bid = self._candidates.get(key)
        if bid is not None and self._recall(bid) is not None:
            return bid, self._recall(bid)
        cache = self._cache()
        spec = _spec_for(d.arch, checkpoint, names)
        if cache is not None:
            basis = cache.lookup(checkpoint, d.rank, spec, d.arch)
            if basis is not None:
                self._candidates[key] = basis.basis_id
                self.remember(basis.basis_id, basis.q)
                return basis.basis_id, basis.q
        started = time.perf_counter()
        self._log(f"computing the rank-{d.rank} basis of {os.path.basename(checkpoint)} "
                  f"({len(names)} layers; once per checkpoint and rank)")
        basis = core.basis.basis_from_checkpoint(checkpoint, d.rank, spec, d.arch,
                                                 device=self._device(), progress=self._progress())
        self.computations += 1
        basis.source["seconds"] = f"{time.perf_counter() - started:.1f}"
        if cache is not None:
            try:
                cache.store(basis, checkpoint, spec, d.arch)
            except OSError as e:
                self._log(f"could not write the basis cache: {e}")
        self._log(f"basis {basis.basis_id} computed in {basis.source['seconds']} s")
        self._status("")
        self._candidates[key] = basis.basis_id
        self.remember(basis.basis_id, basis.q)
        return basis.basis_id, basis.q

    def _progress(self):
        last = [-1.0]

        def report(done: int, total: int, layer: str) -> None:
            fraction = done / max(1, total)
            text = f"computing basis {done}/{total} layers"
            self._status(f"QR-LoRA: {text}")
            if fraction - last[0] >= 0.1 or done == total:
                last[0] = fraction
                self._log(f"{text} ({fraction:.0%})")

        return report


def _spec_for(arch: str, checkpoint: str, names: tuple[str, ...]):
    """A preset (or pair of presets) selecting exactly ``names`` from the checkpoint, else the
    names themselves: a short, readable target spec for the cache index and the basis file."""
    a = core.archs.get(arch)
    try:
        everything = a.linear_targets(core.checkpoint.SafetensorsFile(checkpoint).shapes())
    except (core.FileFormatError, ValueError):
        return list(names)
    presets = sorted(a.presets)
    candidates = [p for p in presets] + [[p, q] for i, p in enumerate(presets) for q in presets[i + 1:]]
    for spec in candidates:
        try:
            if tuple(t.name for t in a.select(everything, spec)) == names:
                return spec
        except ValueError:
            continue
    return list(names)
