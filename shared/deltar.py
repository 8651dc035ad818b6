"""The ΔR file: what a QR-LoRA training produces (format described in docs/formats.md).

safetensors; one tensor ``{layer}.delta_r`` (r × in) per target under its layout-independent
name; ``__qrlora__.basis_sketch`` (layers × probes × r, float32) to check a basis against;
optionally ``{layer}.q`` (out × r) for a "portable" file that needs no basis. Metadata carries
our ``qrlora.*`` keys plus kohya's ``ss_*`` and ``modelspec.*`` keys that WebUI viewers read.
Reading validates everything and never unpickles.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from . import archs
from .archs import Target
from .basis import SKETCH_KEY, Basis, layers_json, parse_layers
from .checkpoint import FileFormatError, SafetensorsFile, save_atomic
from .qr import MASKS, apply_mask, delta_weight, masked_parameter_count

FORMAT_VERSION = 1
KIND = "delta_r"
NETWORK_MODULE = "qrlora"


@dataclass
class DeltaR:
    arch: str
    rank: int
    alpha: float
    mask: str
    layers: dict[str, torch.Tensor]  # name -> ΔR (r × in), mask applied, in model order
    targets: dict[str, Target]  # name -> where the layer lives (shape, original key, rows)
    basis_id: str
    sketch: torch.Tensor | None = None  # (layers × probes × r) in layer order
    q: dict[str, torch.Tensor] | None = None  # embedded basis ("portable" file)
    metadata: dict[str, str] = field(default_factory=dict)  # everything else (ss_*, modelspec.*, ...)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def portable(self) -> bool:
        return bool(self.q)

    def trainable_parameters(self) -> int:
        return sum(masked_parameter_count(self.rank, t.shape[1], self.mask) for t in self.layers.values())

    def delta_weight(self, name: str, q: torch.Tensor) -> torch.Tensor:
        return delta_weight(q, self.layers[name], self.scale, self.mask)


def from_basis(
    basis: Basis,
    delta_r: Mapping[str, torch.Tensor],
    alpha: float,
    mask: str = "triu",
    embed_q: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> DeltaR:
    """A ΔR object for every layer of ``basis`` (layers absent from ``delta_r`` are zero)."""
    layers = {}
    for t in basis.targets:
        dr = delta_r.get(t.name)
        layers[t.name] = torch.zeros(basis.rank, t.shape[1]) if dr is None else apply_mask(dr.detach().float(), mask)
    extra = set(delta_r) - set(layers)
    if extra:
        raise ValueError(f"ΔR given for layers outside the basis: {sorted(extra)[:3]}")
    return DeltaR(
        arch=basis.arch,
        rank=basis.rank,
        alpha=float(alpha),
        mask=mask,
        layers=layers,
        targets={t.name: t for t in basis.targets},
        basis_id=basis.basis_id,
        sketch=basis.sketch(),
        q=dict(basis.q) if embed_q else None,
        metadata=dict(metadata or {}),
    )


# ----------------------------------------------------------------- writing
def standard_metadata(d: DeltaR, output_name: str = "", base_model: str = "") -> dict[str, str]:
    """kohya ``ss_*`` and ``modelspec.*`` keys derived from the file itself."""
    a = archs.get(d.arch)
    title = output_name or d.metadata.get("ss_output_name", "") or "qrlora"
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(d.rank),
        "ss_network_alpha": _num(d.alpha),
        "ss_network_args": json.dumps({"mask": d.mask, "basis_id": d.basis_id}),
        "ss_base_model_version": a.base_model_version,
        "ss_output_name": title,
        "ss_v2": "False",
        "ss_sd_model_name": base_model,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": a.modelspec_architecture.replace("/lora", "/qrlora"),
        "modelspec.implementation": a.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": a.resolution,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }


def save(d: DeltaR, path: str, dtype: torch.dtype = torch.float16, output_name: str = "", base_model: str = "") -> None:
    """Write atomically, with kohya's ``sshs_model_hash`` in the metadata. ΔR is stored in
    ``dtype``; Q (portable files) and the sketch in float32. ``base_model`` (the checkpoint's
    file name) becomes ``ss_sd_model_name``."""
    _check_consistent(d, path)
    tensors: dict[str, torch.Tensor] = {f"{n}.delta_r": apply_mask(t, d.mask).to(dtype) for n, t in d.layers.items()}
    if d.sketch is not None:
        tensors[SKETCH_KEY] = d.sketch.to(torch.float32)
    if d.q:
        tensors.update({f"{n}.q": d.q[n].to(torch.float32) for n in d.layers})
    meta = {**standard_metadata(d, output_name, base_model), **d.metadata}
    if base_model:
        meta["ss_sd_model_name"] = base_model
    meta.update(
        {
            "qrlora.kind": KIND,
            "qrlora.format_version": str(FORMAT_VERSION),
            "qrlora.arch": d.arch,
            "qrlora.rank": str(d.rank),
            "qrlora.alpha": _num(d.alpha),
            "qrlora.mask": d.mask,
            "qrlora.basis_id": d.basis_id,
            "qrlora.portable": "1" if d.q else "0",
            "qrlora.layers": layers_json([d.targets[n] for n in d.layers]),
        }
    )
    save_atomic(tensors, path, {k: str(v) for k, v in meta.items()}, model_hash=True)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _check_consistent(d: DeltaR, path: str) -> None:
    if d.mask not in MASKS:
        raise ValueError(f"{path}: mask {d.mask!r} is not one of {', '.join(MASKS)}")
    for n, t in d.layers.items():
        if t.dim() != 2 or t.shape[0] != d.rank:
            raise ValueError(f"{path}: ΔR of {n} has shape {tuple(t.shape)}, expected ({d.rank}, in)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: ΔR of {n} contains NaN or Inf; refusing to save it")


# ----------------------------------------------------------------- reading
def describe_foreign(keys: Sequence[str]) -> str:
    """What a non-ΔR safetensors file looks like, for error messages."""
    if any(k.endswith(".lora.delta_r.weight") for k in keys):
        return "an official QR-LoRA file: convert it with `qrlora import-official`"
    if any(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in keys):
        return "a standard LoRA: load it with <lora:...>"
    if archs.detect(keys) is not None:
        return "a base model checkpoint"
    return "not a QR-LoRA file"


def load(path: str, expect_arch: str | None = None) -> DeltaR:
    """Read and validate a ΔR file; any problem raises FileFormatError naming file and key."""
    f = SafetensorsFile(path)
    meta = f.metadata
    kind = meta.get("qrlora.kind")
    if kind != KIND:
        what = "a QR-LoRA basis file, not a ΔR file" if kind == "basis" else describe_foreign(f.keys)
        raise FileFormatError(f"{path}: not a QR-LoRA ΔR file ({what})")
    try:
        version = int(meta.get("qrlora.format_version", ""))
    except ValueError:
        raise FileFormatError(f"{path}: metadata qrlora.format_version is missing or not a number") from None
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: written in ΔR format {version}, newer than this qrlora reads (≤ {FORMAT_VERSION}); upgrade qrlora"
        )
    arch = meta.get("qrlora.arch", "")
    if arch not in archs.names():
        raise FileFormatError(f"{path}: unknown architecture {arch!r} in qrlora.arch; known: {', '.join(archs.names())}")
    if expect_arch and arch != expect_arch:
        raise FileFormatError(f"{path}: trained for {arch}, but the loaded model is {expect_arch}")
    rank = _meta_number(path, meta, "qrlora.rank", int)
    alpha = _meta_number(path, meta, "qrlora.alpha", float)
    if rank <= 0 or not math.isfinite(alpha):
        raise FileFormatError(f"{path}: qrlora.rank must be positive and qrlora.alpha finite (got {rank}, {alpha})")
    mask = meta.get("qrlora.mask", "")
    if mask not in MASKS:
        raise FileFormatError(f"{path}: qrlora.mask is {mask!r}; expected one of {', '.join(MASKS)}")
    basis_id = meta.get("qrlora.basis_id", "")
    if not basis_id:
        raise FileFormatError(f"{path}: metadata qrlora.basis_id is missing")
    layer_list = parse_layers(path, meta.get("qrlora.layers"))
    portable = meta.get("qrlora.portable") == "1"

    layers, targets, q = {}, {}, {} if portable else None
    for target in layer_list:
        name, (out_f, in_f) = target.name, target.shape
        key = f"{name}.delta_r"
        if key not in f.header:
            missing = [t.name for t in layer_list if f"{t.name}.delta_r" not in f.header]
            raise FileFormatError(f"{path}: {len(missing)} listed layers have no ΔR tensor (first: {missing[0]})")
        if f.shape(key) != (rank, in_f):
            raise FileFormatError(f"{path}: {key} has shape {f.shape(key)}, metadata says ({rank}, {in_f})")
        layers[name] = _finite(path, key, f.tensor(key)).to(torch.float32)
        targets[name] = target
        if q is not None:
            qkey = f"{name}.q"
            if qkey not in f.header or f.shape(qkey) != (out_f, rank):
                raise FileFormatError(f"{path}: portable file lacks {qkey} of shape ({out_f}, {rank})")
            q[name] = _finite(path, qkey, f.tensor(qkey)).to(torch.float32)
    known = {f"{n}.delta_r" for n in layers} | {f"{n}.q" for n in (q or {})} | {SKETCH_KEY}
    unknown = [k for k in f.keys if k not in known]
    if unknown:
        raise FileFormatError(f"{path}: tensor {unknown[0]!r} is not listed in qrlora.layers ({len(unknown)} such)")
    sketch = None
    if SKETCH_KEY in f.header:
        sketch = f.tensor(SKETCH_KEY).to(torch.float32)
        if sketch.dim() != 3 or sketch.shape[0] != len(layers) or sketch.shape[2] != rank:
            raise FileFormatError(f"{path}: {SKETCH_KEY} has shape {tuple(sketch.shape)}, expected ({len(layers)}, probes, {rank})")
    mine = {k for k in meta if k.startswith("qrlora.")}
    extra = {k: v for k, v in meta.items() if k not in mine}
    return DeltaR(arch, rank, alpha, mask, {n: apply_mask(t, mask) for n, t in layers.items()}, targets,
                  basis_id, sketch, q, extra)


def _meta_number(path, meta, key, kind):
    try:
        return kind(meta[key])
    except (KeyError, ValueError):
        raise FileFormatError(f"{path}: metadata {key} is missing or not a number") from None


def _finite(path: str, key: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise FileFormatError(f"{path}: {key} contains NaN or Inf")
    return t
