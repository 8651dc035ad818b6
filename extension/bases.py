"""Which Q to apply a ΔR file with (the basis contract in README.md), in this order:

1. the Q embedded in a portable file;
2. a basis already in memory or in the basis cache folder under the file's basis id;
3. computed from the loaded checkpoint's *file on disk* (never from in-memory weights, which
   may be patched, cast or quantized), cached by the checkpoint's contents and the request.

Whatever the source, and even when its id is the file's, the basis is measured against the
file's basis sketch (2 × r numbers per layer): a stale cache entry, an altered basis file or
a basis rounded differently under the same id is a mismatch like any other. Then the
mismatch policy decides: ``warn`` (apply, say so with the figure), ``refuse`` (skip the
file), ``apply`` (apply, console note only). Below the threshold it is applied quietly.

A model loaded from a quantized file (fp8, nf4/fp4, GGUF) never gives a basis: its file lacks
the 16-bit weights. Its basis is one made once from the 16-bit weights (``qrlora basis``) and
found by identity instead (``resolve`` with ``loaded``): every basis file records a small random
projection of the weights it was computed from (``qrlora.basis.weight_sketch``); the host
measures the same of its loaded, dequantized weights, and a basis within the storage's rounding
(``IDENTITY_LIMITS``) is the loaded model's. With none, the message names the basis and the
command that makes it.

Computing a basis takes seconds to minutes: ``progress`` (``state_progress`` for the hosts'
``shared.state``) shows it, and ``precompute`` lets a UI compute it ahead of time.
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

# Largest difference between a basis's record of its weights and the loaded model's dequantized
# weights for "the same model", per storage: the core's measured table, shared with the trainer.
IDENTITY_LIMITS = core.basis.IDENTITY_LIMITS
IDENTITY_LIMIT_OTHER = core.basis.IDENTITY_LIMIT_OTHER
_SIXTEEN_BIT = ("F32", "F16", "BF16")


@dataclass
class LoadedModel:
    """What a host offers of a model loaded from a quantized file: where it came from, its
    full layer shapes (original layout, for naming presets) and each target's weight sketch
    measured on the loaded weights as stored before any LoRA merge."""

    file: str  # the loaded file's name, for messages
    shapes: dict  # original-layout key -> shape
    sketch: Callable[[object], tuple[torch.Tensor, str] | None]  # Target -> (weight_sketch, storage name)


identity_limit = core.basis.identity_limit


def quantized_file(checkpoint: str | None, d) -> bool:
    """True when ``checkpoint`` cannot give ``d``'s layers in 16 or 32 bits (a GGUF file, an
    fp8 or bitsandbytes 4-bit safetensors), so no basis may be computed from it."""
    if not checkpoint or not checkpoint.lower().endswith(".safetensors") or not os.path.isfile(checkpoint):
        return bool(checkpoint) and checkpoint.lower().endswith(".gguf")
    try:
        f = core.checkpoint.SafetensorsFile(checkpoint)
    except (core.FileFormatError, ValueError, OSError):
        return False
    keys = set(f.keys)
    found = []
    for t in d.targets.values():
        key = next((p + t.key for p in ("", "model.diffusion_model.") if p + t.key in keys), None)
        if key is not None:
            found.append(f.dtype_name(key))
    return any(dt not in _SIXTEEN_BIT for dt in found)


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


Progress = Callable[[int, int, str], None]  # (layers done, layers total, current layer)


def state_progress(state) -> Progress:
    """A progress callback for A1111's and Forge's ``shared.state``: the text under the
    progress bar and the bar itself (``sampling_step`` of ``sampling_steps``, which the
    sampler resets when generation starts)."""

    def report(done: int, total: int, layer: str) -> None:
        state.textinfo = f"QR-LoRA: computing the basis, layer {done}/{total}"
        state.sampling_steps = total
        state.sampling_step = done

    return report


class BasisResolver:
    def __init__(self, cache_folder: Callable[[], str], device: Callable[[], str] = lambda: "auto",
                 log: Callable[[str], None] = print, status: Callable[[str], None] = lambda s: None,
                 keep: int = 3, progress: Progress | None = None):
        self._cache_folder = cache_folder
        self._device = device
        self._log = log
        self._status = status
        self._keep = keep
        self.progress = progress  # the host's progress display, if any (see state_progress)
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # basis id -> Q
        self._candidates: dict[str, str] = {}  # cache entry key (checkpoint contents, request) -> basis id
        self._checked: dict[tuple, tuple] = {}  # (file sketch, basis id, limit) -> (Q, BasisCheck)
        self._basis_files: dict[str, tuple] = {}  # path -> ((mtime_ns, size), Basis): files read for identity
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
    def resolve(self, d, label: str, checkpoint: str | None, policy: str = "warn", threshold: float = 0.01,
                loaded: LoadedModel | None = None) -> Resolution:
        """The Q to apply ΔR file ``d`` (labelled ``label`` in messages) with; ``loaded`` when the
        host can measure its model's weights (used when ``checkpoint`` is a quantized file)."""
        if quantized_file(checkpoint, d):
            return self._by_identity(d, label, checkpoint, policy, threshold, loaded)
        for source, q in self._by_id(d):
            if q is None or not _covers(q, d):
                continue
            check = self._check(d, q, d.basis_id, threshold)
            if check.ok:
                self.remember(d.basis_id, q)
                return Resolution(q, source)
            self._log(f"{label}: not using the {source} basis: {check.describe()}")
        return self._from_checkpoint(d, label, checkpoint, policy, threshold)

    def _by_id(self, d):
        """(source, Q) under the file's basis id, cheapest first; the cache file is read only
        when the earlier ones are missing or fail their check."""
        if d.q:
            yield "embedded", d.q
        yield "memory", self._recall(d.basis_id)
        cache = self._cache()
        if cache is not None:
            try:
                basis = cache.get(d.basis_id)
            except (core.FileFormatError, ValueError, KeyError) as e:
                self._log(f"ignoring a broken basis file in the cache: {e}")
                basis = None
            yield "cache", None if basis is None else basis.q

    def _check(self, d, q, basis_id: str, threshold: float):
        """``core.basis.check_basis``, remembered per (file sketch, Q) so that generating again
        costs nothing."""
        if d.sketch is None:
            return core.basis.check_basis(d.names, None, d.basis_id, q, basis_id, threshold)
        key = (core.basis.sketch_digest(d.sketch), tuple(d.names), d.basis_id, basis_id, threshold)
        seen = self._checked.get(key)
        if seen is not None and seen[0] is q:
            return seen[1]
        check = core.basis.check_basis(d.names, d.sketch, d.basis_id, q, basis_id, threshold)
        self._checked[key] = (q, check)
        return check

    # ----------------------------------------------------------------- quantized models
    def _by_identity(self, d, label, checkpoint, policy, threshold, loaded) -> Resolution:
        """A quantized model's basis: a basis file whose record of its weights matches the loaded
        weights within the storage's rounding; then the same measured policy as a computed basis."""
        name = os.path.basename(checkpoint or "")
        needed = self._needed(d, name, loaded)
        if loaded is None:
            return Resolution(None, "", message=f"{label}: {name} is quantized and its weights cannot be read here; {needed}")
        training = None  # (source, Q) of the training basis, checked against the file's sketch
        for source, q in self._by_id(d):
            if q is not None and _covers(q, d) and self._check(d, q, d.basis_id, threshold).ok:
                training = (source, q)
                break
        mismatch = ""  # how the training basis's model differs from the loaded one, when measured
        for basis in self._recorded_bases(d):
            if training is None and basis.basis_id == d.basis_id and self._check(d, basis.q, d.basis_id, threshold).ok:
                training = ("cache", basis.q)  # the training basis under another file name
            figure, limit, storages = self._identity(basis, d, loaded)
            if figure is None:
                continue
            if figure > limit:
                if basis.basis_id == d.basis_id:
                    mismatch = (f"the loaded {name} is not the model basis {d.basis_id} was made from: its weights "
                                f"differ by {figure:.1%} ({'/'.join(sorted(storages))} rounding allows {limit:.0%})")
                continue
            self.remember(basis.basis_id, basis.q)
            if basis.basis_id == d.basis_id and training is not None:
                return Resolution(training[1], training[0])
            return self._measured(d, label, basis.q, basis.basis_id, f"the loaded {name} has basis {basis.basis_id}",
                                  policy, threshold, needed)
        if training is None:
            return Resolution(None, "", message=f"{label}: no basis matches the loaded {name}, a quantized file "
                                                f"(the basis is never computed from quantized weights)"
                                                + (f"; {mismatch}" if mismatch else "") + f"; {needed}")
        # the training basis is at hand, but the loaded model is measured to be another one, or
        # nothing records the weights it was made from: the mismatch policy decides
        text = f"{label}: " + (mismatch or f"cannot check that the loaded {name} is the model basis {d.basis_id} "
                                           "was made from (no basis file records its weights)") + f"; {needed}"
        if policy == "refuse":
            return Resolution(None, "", message=text + "; refused (QR-LoRA setting 'on basis mismatch' = refuse)")
        if policy == "apply":
            self._log(text + "; applied anyway (setting)")
            return Resolution(training[1], training[0])
        return Resolution(training[1], training[0], None, text + "; applied with the training basis anyway")

    def _needed(self, d, name: str, loaded) -> str:
        """Which basis is needed and the command that makes it."""
        spec = _spec_for_shapes(d.arch, loaded.shapes if loaded else {}, tuple(d.names))
        targets = " ".join(spec) if isinstance(spec, list) and len(spec) <= 4 else spec if isinstance(spec, str) else None
        folder = self._cache_folder() or "<the QR-LoRA basis folder>"
        out = os.path.join(folder, f"{os.path.splitext(name)[0] or d.arch}-r{d.rank}.safetensors")
        command = (f'qrlora basis "<the 16-bit (bf16/fp16) original of {name}>.safetensors" --rank {d.rank}'
                   + (f" --targets {targets}" if targets else "") + f' -o "{out}"')
        return (f"it needs the rank-{d.rank} basis of the 16-bit original of {name} over the file's "
                f"{len(d.names)} layers (training basis {d.basis_id}); make it once with: {command}")

    def _recorded_bases(self, d):
        """Basis files of ``d``'s architecture and rank covering its layers and recording their
        weights: the training basis's file first, then every other one in the cache folder."""
        folder = self._cache_folder()
        if not folder or not os.path.isdir(folder):
            return
        first = os.path.join(folder, f"{d.basis_id}.safetensors")
        others = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
        for path in [first] + [p for p in others if p != first]:
            if not os.path.isfile(path):
                continue
            try:
                meta = core.checkpoint.read_header(path)[1]
                if meta.get("qrlora.kind") != "basis" or meta.get("qrlora.arch") != d.arch or meta.get("qrlora.rank") != str(d.rank):
                    continue
                st = os.stat(path)
                memo = self._basis_files.get(path)
                if memo is None or memo[0] != (st.st_mtime_ns, st.st_size):
                    memo = ((st.st_mtime_ns, st.st_size), core.basis.load_basis(path))
                    self._basis_files[path] = memo
                    while len(self._basis_files) > self._keep:
                        self._basis_files.pop(next(iter(self._basis_files)))
                basis = memo[1]
            except (core.FileFormatError, ValueError, KeyError, OSError) as e:
                self._log(f"ignoring basis file {path}: {e}")
                continue
            if basis.weight_sketch is not None and _covers(basis.q, d):
                yield basis

    def _identity(self, basis, d, loaded):
        """(pooled relative difference of the loaded weights from the basis's record, the
        storages' limit, the storages), or (None, ...) when a layer cannot be measured."""
        index = {t.name: i for i, t in enumerate(basis.targets)}
        recorded, measured, storages = [], [], set()
        for name in d.names:
            got = loaded.sketch(d.targets[name])
            if got is None or name not in index:
                return None, 0.0, storages
            measured.append(got[0])
            recorded.append(basis.weight_sketch[index[name]])
            storages.add(got[1])
        return core.basis.identity_difference(recorded, measured), identity_limit(storages), storages

    def _measured(self, d, label, q, basis_id, what, policy, threshold, needed) -> Resolution:
        """The mismatch policy on the measured distance between ``q`` and the training basis."""
        check = self._check(d, q, basis_id, threshold)
        if check.ok:
            return Resolution(q, "identity", check.agreement.max if check.agreement else None)
        if check.agreement is None:
            return Resolution(None, "", message=f"{label}: trained on basis {d.basis_id}, {what} is another and the file "
                                                f"has no sketch to compare them; {needed}")
        if check.agreement.missing:
            return Resolution(None, "", message=f"{label}: {check.agreement.describe()}")
        figure = check.agreement.max
        text = f"{label}: trained on basis {d.basis_id} but {what}: {check.agreement.describe()}"
        if policy == "refuse":
            return Resolution(None, "", figure, text + "; refused (QR-LoRA setting 'on basis mismatch' = refuse)")
        if policy == "apply":
            self._log(text + "; applied anyway (setting)")
            return Resolution(q, "identity", figure)
        return Resolution(q, "identity", figure, text + "; applied anyway, results may differ from training")

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
        check = self._check(d, q, candidate_id, threshold)
        if check.same_id and check.ok:
            return Resolution(q, "computed")
        if d.sketch is None:
            if policy == "apply":
                return Resolution(q, "computed", None, f"{label}: trained on another basis ({d.basis_id}); applied anyway (no sketch to measure it)")
            return Resolution(None, "", message=f"{label}: trained on basis {d.basis_id}, the loaded checkpoint gives {candidate_id}, and the file has no sketch to compare them; {where}")
        agree = check.agreement
        if agree.missing:
            return Resolution(None, "", message=f"{label}: {agree.describe()}")
        figure = agree.max
        if check.same_id:  # the right id, the wrong numbers: a mismatch all the same
            text = f"{label}: the loaded checkpoint's basis has the training basis's id {d.basis_id} but {agree.describe()}"
        else:
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
        cache (by the checkpoint's contents), or a one-time computation."""
        names = tuple(d.names)
        spec = _spec_for(d.arch, checkpoint, names)
        basis, _ = self._basis_of(checkpoint, d.rank, spec, d.arch, len(names))
        return basis.basis_id, basis.q

    def precompute(self, checkpoint: str, rank: int, targets=None, arch: str | None = None):
        """Compute (or find in the cache) a checkpoint's basis ahead of time, so the first
        generation with a new checkpoint does not wait for it (what a UI button calls).
        Returns (basis, True if it was already cached)."""
        if not checkpoint.lower().endswith(".safetensors"):
            raise core.FileFormatError(f"{checkpoint}: a basis is computed from .safetensors checkpoints only")
        return self._basis_of(checkpoint, rank, targets, arch, None)

    def _basis_of(self, checkpoint: str, rank: int, spec, arch: str | None, count: int | None):
        key = core.basis.BasisCache.key(checkpoint, rank, spec, arch)  # contents, not path or mtime
        bid = self._candidates.get(key)
        if bid is not None and self._recall(bid) is not None:
            return _Known(bid, self._recall(bid)), True
        cache = self._cache()
        if cache is not None:
            basis = cache.lookup(checkpoint, rank, spec, arch)
            if cache.rejected:
                self._log(cache.rejected)
            if basis is not None:
                self._candidates[key] = basis.basis_id
                self.remember(basis.basis_id, basis.q)
                return basis, True
        started = time.perf_counter()
        self._log(f"computing the rank-{rank} basis of {os.path.basename(checkpoint)} "
                  f"({count or 'its'} layers; once per checkpoint and rank)")
        basis = core.basis.basis_from_checkpoint(checkpoint, rank, spec, arch,
                                                 device=self._device(), progress=self._progress())
        self.computations += 1
        basis.source["seconds"] = f"{time.perf_counter() - started:.1f}"
        if cache is not None:
            try:
                cache.store(basis, checkpoint, spec, arch)
            except (OSError, core.checkpoint.UserError) as e:  # OutputError is a UserError
                self._log(f"could not write the basis cache: {e}")
        self._log(f"basis {basis.basis_id} computed in {basis.source['seconds']} s")
        self._status("")
        self._candidates[key] = basis.basis_id
        self.remember(basis.basis_id, basis.q)
        return basis, False

    def _progress(self):
        last = [-1.0]

        def report(done: int, total: int, layer: str) -> None:
            fraction = done / max(1, total)
            text = f"computing basis {done}/{total} layers"
            self._status(f"QR-LoRA: {text}")
            if self.progress is not None:
                self.progress(done, total, layer)
            if fraction - last[0] >= 0.1 or done == total:
                last[0] = fraction
                self._log(f"{text} ({fraction:.0%})")

        return report


@dataclass
class _Known:
    """A basis already in memory: its id and Q."""

    basis_id: str
    q: dict[str, torch.Tensor]


def _spec_for(arch: str, checkpoint: str, names: tuple[str, ...]):
    """A preset (or pair of presets) selecting exactly ``names`` from the checkpoint, else the
    names themselves: a short, readable target spec for the cache index and the basis file."""
    try:
        shapes = core.checkpoint.SafetensorsFile(checkpoint).shapes()
    except (core.FileFormatError, ValueError):
        return list(names)
    return _spec_for_shapes(arch, shapes, names)


def _spec_for_shapes(arch: str, shapes, names: tuple[str, ...]):
    a = core.archs.get(arch)
    try:
        everything = a.linear_targets(shapes)
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
