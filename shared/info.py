"""`qrlora inspect`: what a safetensors file is and what is in it."""

from __future__ import annotations

import os

from . import archs
from .basis import parse_layers
from .checkpoint import _ITEMSIZE, SafetensorsFile
from .errors import UserError
from .qr import masked_parameter_count
from .similarity import LORA_PAIRS


def describe(path: str) -> dict:
    f = SafetensorsFile(path)
    meta = f.metadata
    info: dict = {"file": path, "size_bytes": os.path.getsize(path)}
    kind = meta.get("qrlora.kind")
    dtypes = sorted({f.dtype_name(k) for k in f.keys})
    info["dtypes"] = dtypes
    if kind in ("delta_r", "basis"):
        layers = parse_layers(path, meta.get("qrlora.layers"))
        rank = int(meta.get("qrlora.rank", "0"))
        info.update(
            kind=kind,
            arch=meta.get("qrlora.arch"),
            rank=rank,
            layers=len(layers),
            basis_id=meta.get("qrlora.basis_id"),
            format_version=meta.get("qrlora.format_version"),
        )
        info.update(_structure(meta.get("qrlora.arch"), [t.name for t in layers]))
        if kind == "delta_r":
            mask = meta.get("qrlora.mask", "none")
            dr_dtype = f.dtype_name(f"{layers[0].name}.delta_r") if layers else "F16"
            item = _ITEMSIZE.get(dr_dtype, 2)
            info.update(
                alpha=float(meta.get("qrlora.alpha", "nan")),
                mask=mask,
                portable=meta.get("qrlora.portable") == "1",
                trainable_parameters=sum(masked_parameter_count(rank, t.shape[1], mask) for t in layers),
                delta_r_dtype=dr_dtype,
                # the same-rank standard LoRA on the same layers, in the same dtype
                equivalent_lora_bytes=sum(rank * (t.shape[0] + t.shape[1]) * item for t in layers),
            )
            info["size_vs_lora"] = info["size_bytes"] / max(1, info["equivalent_lora_bytes"])
    elif any(k.endswith(".lora.delta_r.weight") for k in f.keys):
        names = [k[: -len(".lora.delta_r.weight")] for k in f.keys if k.endswith(".lora.delta_r.weight")]
        first = f"{names[0]}.lora.delta_r.weight"
        info.update(kind="official", layers=len(names), rank=f.shape(first)[0],
                    arch={"transformer": "flux", "unet": "sdxl"}.get(names[0].split(".")[0], "unknown"),
                    has_q=f"{names[0]}.lora.q.weight" in f.header, has_base_r=f"{names[0]}.lora.base_r.weight" in f.header)
    elif any(k.endswith(p[0]) for k in f.keys for p in LORA_PAIRS):
        downs = [k for k in f.keys if k.endswith((".lora_down.weight", ".lora_A.weight"))]
        ranks = sorted({f.shape(k)[0] for k in downs})
        params = sum(f.shape(k)[0] * f.shape(k)[1] for k in downs)
        ups = [k for k in f.keys if k.endswith((".lora_up.weight", ".lora_B.weight"))]
        params += sum(f.shape(k)[0] * f.shape(k)[1] for k in ups)
        info.update(kind="lora", modules=len(downs), rank=ranks[0] if len(ranks) == 1 else ranks,
                    alpha=meta.get("ss_network_alpha"), parameters=params,
                    arch=lora_architecture(meta, f.keys))
    else:
        a = archs.detect(f.keys)
        info.update(kind="checkpoint" if a else "unknown", arch=a.name if a else "unknown", tensors=len(f.keys))
        if a:
            targets = a.linear_targets(f.shapes())
            info["linear_targets"] = len(targets)
            info.update(_structure(a.name, [t.name for t in targets]))
    info["metadata"] = dict(meta)  # in full: --json is for programs; format_info shortens for people
    return info


def _structure(arch_name: str | None, names: list[str]) -> dict[str, int]:
    """The architecture's depth counts (FLUX: double_blocks, single_blocks) among these layers."""
    try:
        return archs.get(arch_name or "").structure(names)
    except UserError:
        return {}


# What kohya's ss_base_model_version and modelspec.architecture name, and the key layouts
# LoRA writers use for each model family.
_BASE_VERSIONS = (("sdxl", "sdxl"), ("flux", "flux"), ("sd3", "sd3"), ("v2", "sd2"), ("sd_v1", "sd1"), ("sd1", "sd1"))
_MODELSPEC = (("stable-diffusion-xl", "sdxl"), ("flux", "flux"), ("stable-diffusion-3", "sd3"),
              ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
_KEY_LAYOUTS = (
    (("lora_unet_double_blocks_", "lora_unet_single_blocks_", "transformer.single_transformer_blocks."), "flux"),
    (("lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_", "text_encoder_2."), "sdxl"),
    (("lora_unet_joint_blocks_",), "sd3"),
    (("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_te_text_model_"), "sd1 or sd2"),
)


def lora_architecture(metadata: dict[str, str], keys) -> str:
    """Which model family a LoRA file is for: from kohya's ``ss_base_model_version``, else
    ``modelspec.architecture``, else the layout of its keys; "unknown" when none says."""
    version = metadata.get("ss_base_model_version", "").lower()
    for marker, name in _BASE_VERSIONS:
        if marker in version:
            return name
    spec = metadata.get("modelspec.architecture", "").lower()
    for marker, name in _MODELSPEC:
        if spec.startswith(marker):
            return name
    for prefixes, name in _KEY_LAYOUTS:
        if any(k.startswith(prefixes) for k in keys):
            return name
    return "unknown"


def format_info(info: dict) -> str:
    lines = [f"{info['file']}: {info['kind']}" + (f" for {info['arch']}" if info.get("arch") else "")]
    order = ("rank", "alpha", "mask", "layers", "modules", "trainable_parameters", "parameters", "basis_id",
             "portable", "dtypes", "format_version", "linear_targets", "double_blocks", "single_blocks")
    for key in order:
        if key in info:
            value = info[key]
            if isinstance(value, int) and not isinstance(value, bool) and value >= 10000:
                value = f"{value:,}"
            lines.append(f"  {key.replace('_', ' ')}: {value}")
    lines.append(f"  size: {_mb(info['size_bytes'])}")
    if "equivalent_lora_bytes" in info:
        lines.append(
            f"  same-rank standard LoRA in {info['delta_r_dtype']}: {_mb(info['equivalent_lora_bytes'])}"
            f" (this file is {info['size_vs_lora']:.3f}× that)"
        )
    if info.get("metadata"):
        lines.append("  metadata:")
        for k in sorted(info["metadata"]):
            v = info["metadata"][k]
            if k != "qrlora.layers":
                lines.append(f"    {k}: {v if len(v) <= 300 else v[:300] + f'… ({len(v)} chars; --json shows all)'}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB ({n:,} bytes)"
