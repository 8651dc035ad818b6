"""Bases: the frozen Q of every targeted layer of one base model at one rank.

A basis is identified by its *basis id*, a digest of the algorithm version, the rank and,
for every target in order, its name, shape, dtype and exact weight bytes. Two checkpoints
with the same target weights (in any file layout) give the same id; a different precision,
a merged LoRA or a fine-tune gives another. A ΔR file names the id of the basis it was
trained against and carries its sketch (``qr.basis_sketch``), so a loader holding some other
basis can measure how far apart they are instead of guessing, and does so every time a basis
is used, whatever its id says (``check_basis``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import archs
from .archs import Target
from .checkpoint import FileFormatError, SafetensorsFile, read_header, save_atomic, write_bytes_atomic
from .qr import _probe, basis_sketch, canonical_basis, sketch_disagreement

ALGORITHM = "qrlora-canonical-1"  # eigh of the smaller Gram matrix, thin QR, positive diag(R)
BASIS_FORMAT_VERSION = 1
SKETCH_KEY = "__qrlora__.basis_sketch"
# Largest sketch disagreement accepted for "the same basis" (the CLI's --max-disagreement and
# the WebUI setting default to it): the routes agree to 1e-4, a bf16 copy of the base is ~1 % off.
DEFAULT_LIMIT = 0.01

Progress = Callable[[int, int, str], None]  # (layers done, layers total, current layer)


@dataclass
class Basis:
    arch: str
    rank: int
    targets: list[Target]
    q: dict[str, torch.Tensor]  # target name -> Q (out × r), float32
    basis_id: str
    target_spec: str | list[str] = ""
    source: dict[str, str] = field(default_factory=dict)  # base model file name, dtype, ...
    stored_sketch: torch.Tensor | None = None  # the sketch a basis file carries (made when Q was computed)
    weight_sketch: torch.Tensor | None = None  # (layers × P × P) of the weights Q was computed from [H3]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def sketch(self) -> torch.Tensor:
        """(layers × probes × r) fingerprint, in target order."""
        return torch.stack([basis_sketch(self.q[t.name]) for t in self.targets])


# ----------------------------------------------------------------- identity
def weight_digest(weight: torch.Tensor) -> str:
    data = weight.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def basis_id_for(arch: str, rank: int, entries: Sequence[tuple[Target, str, str]]) -> str:
    """entries: (target, dtype name, weight digest) in target order."""
    h = hashlib.sha256(f"{ALGORITHM};{arch};r={rank};".encode())
    for target, dtype, digest in entries:
        h.update(f"{target.name}:{target.shape[0]}x{target.shape[1]}:{dtype}:{digest};".encode())
    return f"{arch}-r{rank}-{h.hexdigest()[:16]}"


# ----------------------------------------------------------------- model identity [H3]
# A quantized model (fp8, nf4, GGUF) no longer has the 16-bit bytes the basis id hashes. What
# it still has is, within its storage's rounding, the same numbers: a basis records Gₒᵀ·W·Gᵢ
# for fixed ±1 probe matrices (P × P numbers per layer) of the weights it was computed from,
# and a host measures the same of its loaded, dequantized weights. The relative difference
# (``sketch_disagreement``) is the storage's rounding for the same model and ~140 % for another.
WEIGHT_SKETCH_KEY = "__qrlora__.weight_sketch"
WEIGHT_PROBES = 4


def weight_sketch(weight: torch.Tensor) -> torch.Tensor:
    """Gₒᵀ·W·Gᵢ (P × P, float32) of a 2-D weight, whatever its dtype or device."""
    w = weight.detach().to(torch.float32)
    g_out = _probe(w.shape[0], WEIGHT_PROBES).to(w.device)
    g_in = _probe(w.shape[1], WEIGHT_PROBES).to(w.device)
    return (g_out.mT @ (w @ g_in)).cpu()


# Largest pooled difference (``identity_difference``) between a basis's record of its weights
# and a loaded model's weights for "the same model", by the storage the loaded weights came
# from (torch, safetensors, bitsandbytes and GGUF names). Measured on the tiny FLUX (three
# seeds, every target layer) the same model gives: bf16 0.19 %, fp16 0.02 %, fp8 e4m3fn 3.0 %,
# e5m2 6.1 %, nf4 9.9 %, fp4 12.0 %, GGUF Q8_0 0.46 %, Q4_0 7.1 %, Q4_K 6.9 %; another model
# of the same shapes 136-138 %. The limits are about twice the measured rounding; a fine-tune
# closer to its base than that passes as the base.
IDENTITY_LIMITS = {
    "float32": 0.01, "float16": 0.01, "bfloat16": 0.01, "F32": 0.01, "F16": 0.01, "BF16": 0.01, "Q8_0": 0.01,
    "float8_e4m3fn": 0.06, "float8_e5m2": 0.12, "F8_E4M3": 0.06, "F8_E5M2": 0.12, "nf4": 0.2, "fp4": 0.25,
    "Q4_0": 0.15, "Q4_1": 0.15, "Q5_0": 0.15, "Q5_1": 0.15, "Q4_K": 0.15, "Q5_K": 0.15, "Q6_K": 0.15,
}
IDENTITY_LIMIT_OTHER = 0.4  # Q2_K, Q3_K, the IQ types and storages not measured


def identity_limit(storages) -> float:
    """The limit for weights that came from these storages (the loosest one's)."""
    return max((IDENTITY_LIMITS.get(s, IDENTITY_LIMIT_OTHER) for s in storages), default=IDENTITY_LIMIT_OTHER)


def identity_difference(recorded: Sequence[torch.Tensor], measured: Sequence[torch.Tensor]) -> float:
    """‖measured − recorded‖ / ‖recorded‖ pooled over layers: how far a model's weights are from
    the weights a basis recorded (``weight_sketch`` of each layer, in the same order)."""
    diff = norm = 0.0
    for r, m in zip(recorded, measured, strict=True):
        diff += float((m.to(torch.float32) - r.to(torch.float32)).norm()) ** 2
        norm += float(r.to(torch.float32).norm()) ** 2
    return (diff / max(norm, 1e-30)) ** 0.5


def basis_command(source: str, rank: int, targets: str | Sequence[str] | None, output: str) -> str:
    """The ``qrlora basis`` command line that makes this basis file from ``source`` (the
    16-bit weights), for messages that tell a user which basis is needed."""
    def arg(text: str) -> str:
        return f'"{text}"' if any(c in text for c in " <>()'&;|$") else text

    spec = [targets] if isinstance(targets, str) else list(targets or [])
    return (f"qrlora basis {arg(source)} --rank {rank}" + "".join(f" --targets {arg(s)}" for s in spec[:1])
            + "".join(f" {arg(s)}" for s in spec[1:]) + f" -o {arg(output)}")
# ----------------------------------------------------------------- [/H3]


# ----------------------------------------------------------------- computing
def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compute_basis(
    weights: Callable[[Target], torch.Tensor],
    targets: Sequence[Target],
    arch: str,
    rank: int,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    batch_bytes: int = 256 << 20,
    weight_sketches: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Canonical Q for each target and the basis id.

    ``weights(target)`` returns the target's weight (rows already sliced) in its stored dtype.
    Same-shape layers are decomposed in batches (one kernel launch on a GPU). A dict given as
    ``weight_sketches`` receives each layer's ``weight_sketch`` (the model's measured identity).
    """
    dev = pick_device(device)
    for t in targets:
        if rank > min(t.shape):
            raise ValueError(f"rank {rank} exceeds layer {t.name} ({t.shape[0]}×{t.shape[1]})")
    q: dict[str, torch.Tensor] = {}
    entries: dict[str, tuple[Target, str, str]] = {}
    groups: dict[tuple[int, int], list[Target]] = {}
    for t in targets:
        groups.setdefault(t.shape, []).append(t)
    done = 0
    for shape, group in groups.items():
        # A GPU gains from one kernel launch per batch; the CPU does one matrix at a time anyway,
        # and one layer per step keeps the progress even (layers of one shape are not all equal).
        per_batch = max(1, batch_bytes // (shape[0] * shape[1] * 4)) if dev.type != "cpu" else 1
        for start in range(0, len(group), per_batch):
            chunk = group[start : start + per_batch]
            tensors = []
            for t in chunk:
                w = weights(t)
                if tuple(w.shape) != t.shape:
                    raise ValueError(f"layer {t.name}: weight has shape {tuple(w.shape)}, expected {t.shape}")
                entries[t.name] = (t, str(w.dtype).replace("torch.", ""), weight_digest(w))
                if weight_sketches is not None:
                    weight_sketches[t.name] = weight_sketch(w)
                tensors.append(w.to(dev, torch.float32))
            try:
                qs = canonical_basis(torch.stack(tensors), rank).cpu()
            except ValueError as e:
                names = chunk[0].name if len(chunk) == 1 else f"{chunk[0].name} … {chunk[-1].name}"
                raise ValueError(f"layer {names}: {e}") from None
            for t, qt in zip(chunk, qs):
                q[t.name] = qt.contiguous()
                done += 1
                if progress:
                    progress(done, len(targets), t.name)
    bid = basis_id_for(arch, rank, [entries[t.name] for t in targets])
    return q, bid


def basis_from_checkpoint(
    path: str,
    rank: int,
    targets: str | Sequence[str] | None = None,
    arch: str | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> Basis:
    """Compute the basis of an original-layout single-file checkpoint (weights read lazily),
    or of a diffusers model folder read in that layout."""
    ckpt = archs.open_model(path)
    a, spec, chosen = checkpoint_targets(ckpt, targets, arch)
    refuse_8bit_weights(ckpt, a, chosen, rank)

    def load(t: Target) -> torch.Tensor:
        w = ckpt.tensor(t.key)
        return w[t.rows[0] : t.rows[1]] if t.rows else w

    sketches: dict[str, torch.Tensor] = {}
    q, bid = compute_basis(load, chosen, a.name, rank, device=device, progress=progress, weight_sketches=sketches)
    dtypes = sorted({ckpt.dtype_name(t.key) for t in chosen})
    source = {"base_model": os.path.basename(os.path.normpath(path)), "weight_dtype": ",".join(dtypes)}
    return Basis(a.name, rank, chosen, q, bid, spec if isinstance(spec, str) else list(spec), source,
                 weight_sketch=torch.stack([sketches[t.name] for t in chosen]))


def refuse_8bit_weights(ckpt, a: archs.Architecture, chosen: Sequence[Target], rank: int) -> None:
    """A basis is made from the 16-bit weights ΔR files are trained against: fp8 storage rounds
    them (Q would differ by several percent), so an fp8 file is refused, naming the way out."""
    stored = sorted({ckpt.dtype_name(t.key) for t in chosen if ckpt.dtype_name(t.key).startswith("F8")})
    if stored:
        raise FileFormatError(
            f"{ckpt.path}: the {a.title} weights are stored in {stored[0]} (8-bit), which rounds away the 16-bit"
            f" weights a basis is defined on; make the basis once from the bf16/fp16 file of the same model"
            f" (qrlora basis flux1-dev.safetensors --rank {rank} -o basis-r{rank}.safetensors) and give that"
            " basis file wherever this fp8 model is used")


def checkpoint_targets(ckpt: SafetensorsFile, targets, arch: str | None):
    """(architecture, target spec, targets in model order) of a request on a checkpoint, from
    its header alone. Specs naming the same layers in any order select the same list."""
    a = resolve_arch(ckpt, arch)
    spec = targets or a.default_preset
    return a, spec, a.select(a.linear_targets(ckpt.shapes()), spec)


def resolve_arch(ckpt: SafetensorsFile, arch: str | None) -> archs.Architecture:
    if arch:
        a = archs.get(arch)
        if not a.detect(ckpt.keys):
            raise FileFormatError(f"{ckpt.path}: does not look like a {a.title} checkpoint in its original layout")
        return a
    a = archs.detect(ckpt.keys)
    if a is None:
        raise FileFormatError(
            f"{ckpt.path}: unknown model layout; expected an SGM-layout SDXL or BFL-layout FLUX single-file checkpoint"
        )
    return a


# ----------------------------------------------------------------- files
def layers_json(targets: Sequence[Target]) -> str:
    """The layer list stored in basis and ΔR files: name, out, in, and where the weight lives in
    the original layout (key, rows), so export needs no checkpoint."""
    rows = [[t.name, t.shape[0], t.shape[1], t.key, list(t.rows) if t.rows else None] for t in targets]
    return json.dumps(rows, separators=(",", ":"))


def parse_layers(path: str, text: str | None) -> list[Target]:
    try:
        out = []
        for entry in json.loads(text or ""):
            name, out_f, in_f = str(entry[0]), int(entry[1]), int(entry[2])
            key = str(entry[3]) if len(entry) > 3 and entry[3] else ""
            rows = tuple(int(x) for x in entry[4]) if len(entry) > 4 and entry[4] else None
            out.append(Target(name, key, rows, (out_f, in_f)))
        return out
    except (ValueError, TypeError, IndexError):
        raise FileFormatError(f"{path}: metadata qrlora.layers is missing or malformed") from None


def save_basis(basis: Basis, path: str, dtype: torch.dtype = torch.float32) -> None:
    """The basis and its sketch (made from the Q being saved, in float32), so a reader can tell
    a damaged or altered Q from the one that was computed."""
    tensors = {f"{t.name}.q": basis.q[t.name].to(dtype) for t in basis.targets}
    tensors[SKETCH_KEY] = basis.sketch()
    if basis.weight_sketch is not None:  # [H3]
        tensors[WEIGHT_SKETCH_KEY] = basis.weight_sketch.to(torch.float32).contiguous()
    meta = {
        "qrlora.kind": "basis",
        "qrlora.format_version": str(BASIS_FORMAT_VERSION),
        "qrlora.algorithm": ALGORITHM,
        "qrlora.arch": basis.arch,
        "qrlora.rank": str(basis.rank),
        "qrlora.basis_id": basis.basis_id,
        "qrlora.targets": json.dumps(basis.target_spec),
        "qrlora.layers": layers_json(basis.targets),
        **{f"qrlora.{k}": v for k, v in basis.source.items()},
    }
    save_atomic(tensors, path, meta)


def load_basis(path: str) -> Basis:
    header, meta, _ = read_header(path)
    if meta.get("qrlora.kind") != "basis":
        raise FileFormatError(f"{path}: not a QR-LoRA basis file (qrlora.kind is {meta.get('qrlora.kind')!r})")
    version = int(meta.get("qrlora.format_version", "0") or 0)
    if version > BASIS_FORMAT_VERSION:
        raise FileFormatError(f"{path}: basis format {version} is newer than this qrlora understands ({BASIS_FORMAT_VERSION}); upgrade")
    arch = archs.get(meta.get("qrlora.arch", "")).name
    rank = int(meta["qrlora.rank"])
    layers = parse_layers(path, meta.get("qrlora.layers"))
    f = SafetensorsFile(path)
    q = {}
    for target in layers:
        name, out_f = target.name, target.shape[0]
        key = f"{name}.q"
        if key not in header:
            raise FileFormatError(f"{path}: layer {name} is listed but tensor {key!r} is missing")
        if f.shape(key) != (out_f, rank):
            raise FileFormatError(f"{path}: {key} has shape {f.shape(key)}, expected ({out_f}, {rank})")
        t = f.tensor(key).to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"{path}: {key} contains NaN or Inf")
        q[name] = t
    stored = None
    if SKETCH_KEY in header:
        stored = f.tensor(SKETCH_KEY).to(torch.float32)
        if stored.dim() != 3 or stored.shape[0] != len(layers) or stored.shape[2] != rank:
            raise FileFormatError(f"{path}: {SKETCH_KEY} has shape {tuple(stored.shape)}, expected ({len(layers)}, probes, {rank})")
    weights = None  # [H3]
    if WEIGHT_SKETCH_KEY in header:
        weights = f.tensor(WEIGHT_SKETCH_KEY).to(torch.float32)
        if tuple(weights.shape) != (len(layers), WEIGHT_PROBES, WEIGHT_PROBES):
            raise FileFormatError(f"{path}: {WEIGHT_SKETCH_KEY} has shape {tuple(weights.shape)}, "
                                  f"expected ({len(layers)}, {WEIGHT_PROBES}, {WEIGHT_PROBES})")
    spec = json.loads(meta.get("qrlora.targets", '""'))
    source = {k[len("qrlora.") :]: v for k, v in meta.items() if k in ("qrlora.base_model", "qrlora.weight_dtype")}
    return Basis(arch, rank, layers, q, meta["qrlora.basis_id"], spec, source, stored, weights)


# ----------------------------------------------------------------- agreement
@dataclass
class Agreement:
    """How far a candidate basis is from the one a ΔR file was trained against."""

    per_layer: dict[str, float]  # relative ‖Q′ − Q‖ estimate per layer
    missing: list[str]  # layers the candidate basis lacks

    @property
    def max(self) -> float:
        return max(self.per_layer.values(), default=0.0)

    @property
    def mean(self) -> float:
        return sum(self.per_layer.values()) / max(1, len(self.per_layer))

    @property
    def worst_layer(self) -> str:
        return max(self.per_layer, key=self.per_layer.get) if self.per_layer else ""

    def describe(self) -> str:
        if self.missing:
            return f"{len(self.missing)} layers missing from the basis (first: {self.missing[0]})"
        return f"basis differs by {self.max:.2%} at most (mean {self.mean:.2%}, worst layer {self.worst_layer})"


def agreement(names: Sequence[str], expected_sketch: torch.Tensor, candidate: Mapping[str, torch.Tensor]) -> Agreement:
    per_layer, missing = {}, []
    for name, expected in zip(names, expected_sketch):
        if name not in candidate:
            missing.append(name)
            continue
        per_layer[name] = sketch_disagreement(expected, basis_sketch(candidate[name]))
    return Agreement(per_layer, missing)


@dataclass
class BasisCheck:
    """A candidate basis measured against the one a ΔR file (or a basis file's own record)
    names. A matching id is a claim; the sketch is the evidence, so both are looked at."""

    expected_id: str
    basis_id: str
    agreement: Agreement | None  # None when there is no sketch to measure with
    limit: float

    @property
    def same_id(self) -> bool:
        return self.expected_id == self.basis_id

    @property
    def ok(self) -> bool:
        """Usable as the training basis: measured within the limit (or, with nothing to
        measure, at least the same id)."""
        if self.agreement is None:
            return self.same_id
        return not self.agreement.missing and self.agreement.max <= self.limit

    def describe(self) -> str:
        ids = (f"basis {self.basis_id}" if self.same_id
               else f"basis {self.basis_id} is not the training basis {self.expected_id}:")
        if self.agreement is None:
            return f"{ids} (no sketch to measure it)" if self.same_id else f"{ids} no sketch to measure the difference"
        figure = self.agreement.describe()
        if self.same_id and not self.ok:
            return f"{ids} has the training basis's id but {figure} (limit {self.limit:.2%})"
        return f"{ids} {figure}"


def check_basis(names: Sequence[str], sketch: torch.Tensor | None, expected_id: str,
                q: Mapping[str, torch.Tensor], basis_id: str, limit: float = DEFAULT_LIMIT) -> BasisCheck:
    """Measure ``q`` (id ``basis_id``) against the sketch of the basis ``expected_id``, always:
    a stale cache entry, an altered file or a route that rounded differently can carry the right
    id. Costs 2 × r numbers per layer (milliseconds for SDXL)."""
    measured = None if sketch is None else agreement(names, sketch, q)
    return BasisCheck(expected_id, basis_id, measured, limit)


def sketch_digest(sketch: torch.Tensor) -> str:
    return hashlib.sha256(sketch.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------- cache
ENTRY_VERSION = 1
SAMPLE_BYTES = 256


def content_fingerprint(ckpt: SafetensorsFile, targets: Sequence[Target]) -> str:
    """A cheap digest of what a basis depends on: the file size, the header bytes (names,
    dtypes, shapes, offsets, metadata) and SAMPLE_BYTES from the start and the middle of every
    target weight. A checkpoint replaced under the same path, size and mtime (``cp -p``), a
    fine-tune or a merged LoRA (both change every element of a weight they touch) all change
    it; the full identity, every byte of every target, is the basis id. A diffusers folder:
    the same over each file holding the targets' parts."""
    if not isinstance(ckpt, SafetensorsFile):
        parts = ckpt.files_and_keys([t.key for t in targets])
        h = hashlib.sha256()
        for shard_path in sorted(parts):
            shard, keys = parts[shard_path]
            h.update(content_fingerprint(shard, [Target(k, k, None, (0, 0)) for k in keys]).encode())
        return h.hexdigest()
    spans = {}
    for t in targets:
        start, stop = ckpt.header[t.key]["data_offsets"]
        length = stop - start
        for at in (0, max(0, length // 2 - SAMPLE_BYTES // 2)):
            spans[ckpt.data_offset + start + at] = min(SAMPLE_BYTES, length - at)
    h = hashlib.sha256(f"{os.path.getsize(ckpt.path)};".encode())
    with open(ckpt.path, "rb") as f:
        h.update(f.read(ckpt.data_offset))
        for offset in sorted(spans):  # in file order: one forward sweep on a spinning disk
            f.seek(offset)
            h.update(f.read(spans[offset]))
    return h.hexdigest()


class BasisCache:
    """A folder of basis files named by basis id, and one small JSON entry per (checkpoint
    contents, rank, architecture, layer set) naming the id: ``entries/<key>.json``. Each entry
    is written on its own by an atomic rename, so two WebUIs and a trainer sharing the folder
    never lose or corrupt each other's entries (there is no shared index to rewrite).

    The key is computed from the checkpoint's contents (``content_fingerprint``), never its
    path or mtime, and from the selected layers in model order, so any spelling of the same
    layer set finds the same entry. Every hit is checked: the basis file's Q must agree with
    the sketch recorded when it was computed, and that sketch must be the one the entry saw."""

    def __init__(self, folder: str):
        self.folder = folder
        self.entries = os.path.join(folder, "entries")
        self.rejected = ""  # why the last lookup refused what it found (for messages and tests)

    def path_for(self, basis_id: str) -> str:
        return os.path.join(self.folder, f"{basis_id}.safetensors")

    @staticmethod
    def key(checkpoint: str, rank: int, targets=None, arch: str | None = None) -> str:
        """The entry key of a request: the checkpoint's contents, rank, architecture and the
        selected layers (reads the header and a few bytes per layer; usable without a folder)."""
        ckpt = archs.open_model(checkpoint)
        a, _, chosen = checkpoint_targets(ckpt, targets, arch)
        request = [ENTRY_VERSION, content_fingerprint(ckpt, chosen), rank, a.name, [t.name for t in chosen]]
        return hashlib.sha256(json.dumps(request).encode()).hexdigest()[:32]

    def _entry_path(self, key: str) -> str:
        return os.path.join(self.entries, f"{key}.json")

    def _read_entry(self, key: str) -> dict | None:
        try:
            with open(self._entry_path(key), encoding="utf-8") as f:
                entry = json.load(f)
            return entry if isinstance(entry, dict) and isinstance(entry.get("basis_id"), str) else None
        except (OSError, ValueError):
            return None

    def lookup(self, checkpoint: str, rank: int, targets=None, arch: str | None = None,
               limit: float = DEFAULT_LIMIT) -> Basis | None:
        self.rejected = ""
        entry = self._read_entry(self.key(checkpoint, rank, targets, arch))
        if entry is None:
            return None
        try:
            basis = self.get(entry["basis_id"])
        except (FileFormatError, ValueError, KeyError) as e:
            self.rejected = f"the cached basis file is unreadable: {e}"
            return None
        if basis is None:
            return None
        problem = self._verify(basis, entry.get("sketch_sha256"), limit)
        if not problem and basis.weight_sketch is None:  # [H3] one that cannot identify a quantized copy
            problem = "the file records no projection of the weights it was made from (an older qrlora made it)"
        if problem:
            self.rejected = f"{self.path_for(basis.basis_id)}: {problem}; computing it again"
            return None
        return basis

    @staticmethod
    def _verify(basis: Basis, digest: str | None, limit: float) -> str:
        """'' when the file's Q is the one whose sketch the entry recorded, else the reason."""
        if basis.stored_sketch is None:
            return "the file carries no sketch"
        if digest is not None and sketch_digest(basis.stored_sketch) != digest:
            return "the file is not the one this entry recorded (another sketch)"
        check = check_basis(basis.names, basis.stored_sketch, basis.basis_id, basis.q, basis.basis_id, limit)
        return "" if check.ok else check.describe()

    def get(self, basis_id: str) -> Basis | None:
        path = self.path_for(basis_id)
        return load_basis(path) if os.path.exists(path) else None

    def store(self, basis: Basis, checkpoint: str | None = None, targets=None, arch: str | None = None) -> str:
        """Keep ``basis`` (a file already there under its id is kept when it is sound and agrees
        with this one, so two routes never take turns rewriting it), and with ``checkpoint``
        record the entry that finds it from that checkpoint and request."""
        os.makedirs(self.folder, exist_ok=True)
        path = self.path_for(basis.basis_id)
        kept = None
        try:
            kept = self.get(basis.basis_id)
        except (FileFormatError, ValueError, KeyError):
            kept = None
        if kept is not None and (kept.weight_sketch is not None or basis.weight_sketch is None) \
                and not self._verify(kept, None, DEFAULT_LIMIT) and check_basis(
                kept.names, kept.stored_sketch, kept.basis_id, basis.q, basis.basis_id).ok:
            digest = sketch_digest(kept.stored_sketch)
        else:
            save_basis(basis, path)
            digest = sketch_digest(basis.sketch())
        if checkpoint:
            entry = {"version": ENTRY_VERSION, "basis_id": basis.basis_id, "sketch_sha256": digest,
                     "checkpoint": os.path.realpath(checkpoint), "rank": basis.rank, "arch": basis.arch,
                     "layers": len(basis.targets), "targets": basis.target_spec}
            write_bytes_atomic(self._entry_path(self.key(checkpoint, basis.rank, targets, arch)),
                               json.dumps(entry, indent=1).encode())
        return path

    def get_or_compute(
        self,
        checkpoint: str,
        rank: int,
        targets: str | Sequence[str] | None = None,
        arch: str | None = None,
        device=None,
        progress: Progress | None = None,
        log: Callable[[str], None] | None = None,
    ) -> tuple[Basis, bool]:
        """(basis, True if it came from the cache)."""
        spec = list(targets) if isinstance(targets, (list, tuple)) else targets
        hit = self.lookup(checkpoint, rank, spec, arch)
        if hit is not None:
            return hit, True
        if self.rejected and log:
            log(self.rejected)
        started = time.perf_counter()
        basis = basis_from_checkpoint(checkpoint, rank, spec, arch, device=device, progress=progress)
        basis.source["seconds"] = f"{time.perf_counter() - started:.1f}"
        self.store(basis, checkpoint, spec, arch)
        return basis, False
