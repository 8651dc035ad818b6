"""Bases: the frozen Q of every targeted layer of one base model at one rank.

A basis is identified by its *basis id*, a digest of the algorithm version, the rank and,
for every target in order, its name, shape, dtype and exact weight bytes. Two checkpoints
with the same target weights (in any file layout) give the same id; a different precision,
a merged LoRA or a fine-tune gives another. A ΔR file names the id of the basis it was
trained against and carries its sketch (``qr.basis_sketch``), so a loader holding some other
basis can measure how far apart they are instead of guessing.
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
from .checkpoint import FileFormatError, SafetensorsFile, read_header, save_atomic
from .qr import basis_sketch, canonical_basis, sketch_disagreement

ALGORITHM = "qrlora-canonical-1"  # eigh of the smaller Gram matrix, thin QR, positive diag(R)
BASIS_FORMAT_VERSION = 1
SKETCH_KEY = "__qrlora__.basis_sketch"

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
) -> tuple[dict[str, torch.Tensor], str]:
    """Canonical Q for each target and the basis id.

    ``weights(target)`` returns the target's weight (rows already sliced) in its stored dtype.
    Same-shape layers are decomposed in batches (one kernel launch on a GPU).
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
        per_batch = max(1, batch_bytes // (shape[0] * shape[1] * 4))
        for start in range(0, len(group), per_batch):
            chunk = group[start : start + per_batch]
            tensors = []
            for t in chunk:
                w = weights(t)
                if tuple(w.shape) != t.shape:
                    raise ValueError(f"layer {t.name}: weight has shape {tuple(w.shape)}, expected {t.shape}")
                entries[t.name] = (t, str(w.dtype).replace("torch.", ""), weight_digest(w))
                tensors.append(w.to(dev, torch.float32))
            qs = canonical_basis(torch.stack(tensors), rank).cpu()
            for t, qt in zip(chunk, qs):
                q[t.name] = qt.contiguous()
            done += len(chunk)
            if progress:
                progress(done, len(targets), chunk[-1].name)
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
    """Compute the basis of an original-layout single-file checkpoint (weights read lazily)."""
    ckpt = SafetensorsFile(path)
    a = resolve_arch(ckpt, arch)
    spec = targets or a.default_preset
    chosen = a.select(a.linear_targets(ckpt.shapes()), spec)

    def load(t: Target) -> torch.Tensor:
        w = ckpt.tensor(t.key)
        return w[t.rows[0] : t.rows[1]] if t.rows else w

    q, bid = compute_basis(load, chosen, a.name, rank, device=device, progress=progress)
    dtypes = sorted({ckpt.dtype_name(t.key) for t in chosen})
    source = {"base_model": os.path.basename(path), "weight_dtype": ",".join(dtypes)}
    return Basis(a.name, rank, chosen, q, bid, spec if isinstance(spec, str) else list(spec), source)


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
    tensors = {f"{t.name}.q": basis.q[t.name].to(dtype) for t in basis.targets}
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
    spec = json.loads(meta.get("qrlora.targets", '""'))
    source = {k[len("qrlora.") :]: v for k, v in meta.items() if k in ("qrlora.base_model", "qrlora.weight_dtype")}
    return Basis(arch, rank, layers, q, meta["qrlora.basis_id"], spec, source)


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


# ----------------------------------------------------------------- cache
class BasisCache:
    """A folder of basis files named by basis id, plus an index from a checkpoint file's
    identity (path, size, mtime) and the request (rank, targets) to the id, so that a hit
    costs one stat and one file read, never a hash of the checkpoint."""

    def __init__(self, folder: str):
        self.folder = folder
        self.index_path = os.path.join(folder, "index.json")

    def path_for(self, basis_id: str) -> str:
        return os.path.join(self.folder, f"{basis_id}.safetensors")

    def _index(self) -> dict:
        try:
            with open(self.index_path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _key(checkpoint: str, rank: int, targets, arch: str | None) -> str:
        st = os.stat(checkpoint)
        return json.dumps([os.path.realpath(checkpoint), st.st_size, st.st_mtime_ns, rank, targets, arch])

    def lookup(self, checkpoint: str, rank: int, targets=None, arch: str | None = None) -> Basis | None:
        bid = self._index().get(self._key(checkpoint, rank, targets, arch))
        if bid and os.path.exists(self.path_for(bid)):
            return load_basis(self.path_for(bid))
        return None

    def get(self, basis_id: str) -> Basis | None:
        path = self.path_for(basis_id)
        return load_basis(path) if os.path.exists(path) else None

    def store(self, basis: Basis, checkpoint: str | None = None, targets=None, arch: str | None = None) -> str:
        os.makedirs(self.folder, exist_ok=True)
        path = self.path_for(basis.basis_id)
        if not os.path.exists(path):
            save_basis(basis, path)
        if checkpoint:
            index = self._index()
            index[self._key(checkpoint, basis.rank, targets, arch)] = basis.basis_id
            tmp = f"{self.index_path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=0)
            os.replace(tmp, self.index_path)
        return path

    def get_or_compute(
        self,
        checkpoint: str,
        rank: int,
        targets: str | Sequence[str] | None = None,
        arch: str | None = None,
        device=None,
        progress: Progress | None = None,
    ) -> tuple[Basis, bool]:
        """(basis, True if it came from the cache)."""
        spec = list(targets) if isinstance(targets, (list, tuple)) else targets
        hit = self.lookup(checkpoint, rank, spec, arch)
        if hit is not None:
            return hit, True
        started = time.perf_counter()
        basis = basis_from_checkpoint(checkpoint, rank, spec, arch, device=device, progress=progress)
        basis.source["seconds"] = f"{time.perf_counter() - started:.1f}"
        self.store(basis, checkpoint, spec, arch)
        return basis, False
