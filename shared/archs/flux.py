"""FLUX.1: diffusers ``FluxTransformer2DModel`` names <-> the BFL single-file layout.

The WebUIs and users' files hold the BFL layout (``flux1-dev.safetensors``), where several
diffusers linears are row blocks of one fused weight:

- double block ``img_attn.qkv`` = [to_q; to_k; to_v] and ``txt_attn.qkv`` =
  [add_q_proj; add_k_proj; add_v_proj], each H rows;
- single block ``linear1`` = [to_q; to_k; to_v; proj_mlp], H rows each then the MLP rows.

Every other linear is one BFL module under another name. The tables below are the only
statement of this correspondence in the project: ``Flux.linear_targets`` reads them to
slice a BFL checkpoint, and ``diffusers_to_bfl`` reads them to write one (the tiny test
checkpoints), so the two cannot drift apart.

Modulation order (checked against diffusers' ``AdaLayerNormZero``/``AdaLayerNormZeroSingle``
and BFL's ``Modulation``): both chunk the block modulation linears as (shift, scale, gate)
[x2 for double blocks], so ``img_mod.lin``/``txt_mod.lin``/``modulation.lin`` map to
``norm1.linear``/``norm1_context.linear``/``norm.linear`` unchanged. Only the final layer
differs: BFL's ``LastLayer`` chunks (shift, scale), diffusers' ``AdaLayerNormContinuous``
(scale, shift), so ``final_layer.adaLN_modulation.1`` has its halves swapped. That layer is
not a target; the swap matters only for full conversions.
"""

from __future__ import annotations

import re
from typing import Collection, Iterable, Mapping, Sequence

import torch

from . import Architecture, Target, register

# Prefixes a FLUX transformer may carry in a single file: none (BFL release, Forge/A1111
# UNet folder) or ComfyUI's all-in-one checkpoints, where the VAE and text encoders sit
# beside it under other prefixes.
_PREFIXES = ("", "model.diffusion_model.")

# Per block: (diffusers module, BFL module, slot). slot is the row block of a fused BFL
# weight the diffusers module occupies (0, 1, 2 = H rows each at 0, H, 2H; 3 = the rows after
# 3H), None when the module is not fused. Listed in diffusers' module order, which is the
# order targets are returned in.
DOUBLE_BLOCK: tuple[tuple[str, str, int | None], ...] = (
    ("norm1.linear", "img_mod.lin", None),
    ("norm1_context.linear", "txt_mod.lin", None),
    ("attn.to_q", "img_attn.qkv", 0),
    ("attn.to_k", "img_attn.qkv", 1),
    ("attn.to_v", "img_attn.qkv", 2),
    ("attn.to_out.0", "img_attn.proj", None),
    ("attn.add_q_proj", "txt_attn.qkv", 0),
    ("attn.add_k_proj", "txt_attn.qkv", 1),
    ("attn.add_v_proj", "txt_attn.qkv", 2),
    ("attn.to_add_out", "txt_attn.proj", None),
    ("ff.net.0.proj", "img_mlp.0", None),
    ("ff.net.2", "img_mlp.2", None),
    ("ff_context.net.0.proj", "txt_mlp.0", None),
    ("ff_context.net.2", "txt_mlp.2", None),
)
SINGLE_BLOCK: tuple[tuple[str, str, int | None], ...] = (
    ("norm.linear", "modulation.lin", None),
    ("proj_mlp", "linear1", 3),
    ("proj_out", "linear2", None),
    ("attn.to_q", "linear1", 0),
    ("attn.to_k", "linear1", 1),
    ("attn.to_v", "linear1", 2),
)
# The q/k RMSNorms: diffusers ``<module>.weight`` <-> BFL ``<module>.scale``.
DOUBLE_BLOCK_NORMS: tuple[tuple[str, str], ...] = (
    ("attn.norm_q", "img_attn.norm.query_norm"),
    ("attn.norm_k", "img_attn.norm.key_norm"),
    ("attn.norm_added_q", "txt_attn.norm.query_norm"),
    ("attn.norm_added_k", "txt_attn.norm.key_norm"),
)
SINGLE_BLOCK_NORMS: tuple[tuple[str, str], ...] = (
    ("attn.norm_q", "norm.query_norm"),
    ("attn.norm_k", "norm.key_norm"),
)
# Outside the blocks (not targets; used by full conversions). guidance_in exists only in
# guidance-distilled models (FLUX.1-dev), not in schnell.
OUTER: tuple[tuple[str, str], ...] = (
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),  # (scale, shift) <-> (shift, scale)
    ("proj_out", "final_layer.linear"),
)
_SWAPPED_BFL = "final_layer.adaLN_modulation.1."  # (scale, shift) <-> (shift, scale)

# The single-block MLP is this many times the hidden size in every FLUX.1 release (BFL's
# ``mlp_ratio``; diffusers' FluxTransformer2DModel has no option for it). Needed only to give
# the full width of ``linear1`` from a q/k/v target alone; linear_targets checks each file.
MLP_RATIO = 4

_DOUBLE = "double_blocks"
_SINGLE = "single_blocks"
_D_DOUBLE = "transformer.transformer_blocks"
_D_SINGLE = "transformer.single_transformer_blocks"


def checkpoint_prefix(keys: Collection[str]) -> str | None:
    """The prefix of the FLUX transformer's keys in a file ("" for none), or None if the
    file holds no FLUX transformer.

    Blocks with their own modulation (``img_mod.lin``) are required: Chroma reuses the
    double/single block names but has no per-block modulation, and is not FLUX.1.
    """
    for prefix in _PREFIXES:
        if f"{prefix}{_DOUBLE}.0.img_attn.qkv.weight" in keys and f"{prefix}{_DOUBLE}.0.img_mod.lin.weight" in keys:
            return prefix
    return None


def _block_indices(keys: Collection[str], prefix: str, kind: str) -> list[int]:
    pattern = re.compile(re.escape(f"{prefix}{kind}.") + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _slot_rows(slot: int, hidden: int, fused_rows: int) -> tuple[int, int]:
    # FLUX attention is as wide as the stream (heads x head_dim = hidden), so q, k and v each
    # take ``hidden`` rows; the single blocks' MLP takes whatever follows.
    if slot < 3:
        return slot * hidden, (slot + 1) * hidden
    return 3 * hidden, fused_rows


class Flux(Architecture):
    name = "flux"
    title = "FLUX.1"
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    resolution = "1024x1024"
    presets = {
        # The official QR-LoRA target_modules: attention and FF of the double blocks, only
        # q/k/v of the single blocks (342 layers on FLUX.1-dev).
        "flux-official": (
            f"{_D_DOUBLE}.*.attn.to_[qkv]",
            f"{_D_DOUBLE}.*.attn.to_out.0",
            f"{_D_DOUBLE}.*.attn.add_[qkv]_proj",
            f"{_D_DOUBLE}.*.attn.to_add_out",
            f"{_D_DOUBLE}.*.ff.net.0.proj",
            f"{_D_DOUBLE}.*.ff.net.2",
            f"{_D_DOUBLE}.*.ff_context.net.0.proj",
            f"{_D_DOUBLE}.*.ff_context.net.2",
            f"{_D_SINGLE}.*.attn.to_[qkv]",
        ),
        "flux-attn": (
            f"{_D_DOUBLE}.*.attn.to_[qkv]",
            f"{_D_DOUBLE}.*.attn.to_out.0",
            f"{_D_DOUBLE}.*.attn.add_[qkv]_proj",
            f"{_D_DOUBLE}.*.attn.to_add_out",
            f"{_D_SINGLE}.*.attn.to_[qkv]",
        ),
        # Every linear of the blocks, modulation included: what kohya's lora_flux trains,
        # counted per diffusers module (fused BFL modules count once per slice).
        "flux-all": (f"{_D_DOUBLE}.*", f"{_D_SINGLE}.*"),
    }
    default_preset = "flux-official"
    diffusers_components = {"transformer": "transformer"}

    def detect(self, keys: Collection[str]) -> bool:
        return checkpoint_prefix(keys) is not None

    def open_folder(self, path: str):
        return open_diffusers_folder(path)

    def structure(self, names: Iterable[str]) -> dict[str, int]:
        blocks: dict[str, set[str]] = {"double_blocks": set(), "single_blocks": set()}
        for name in names:
            for kind, d_kind in (("double_blocks", _D_DOUBLE), ("single_blocks", _D_SINGLE)):
                if name.startswith(d_kind + "."):
                    blocks[kind].add(name[len(d_kind) + 1 :].split(".", 1)[0])
        return {kind: len(found) for kind, found in blocks.items()}

    def linear_targets(self, shapes: Mapping[str, Sequence[int]]) -> list[Target]:
        prefix = checkpoint_prefix(shapes)
        if prefix is None:
            raise ValueError("not a FLUX transformer checkpoint: no double_blocks.0.img_attn.qkv.weight")
        targets = []
        for kind, d_kind, table in ((_DOUBLE, _D_DOUBLE, DOUBLE_BLOCK), (_SINGLE, _D_SINGLE, SINGLE_BLOCK)):
            for n in _block_indices(shapes, prefix, kind):
                block = f"{prefix}{kind}.{n}."
                _check_fused_widths(shapes, block, kind)
                for d_module, bfl_module, slot in table:
                    key = f"{block}{bfl_module}.weight"
                    out, inp = _shape2(shapes, key)
                    rows = None if slot is None else _slot_rows(slot, inp, out)
                    size = out if rows is None else rows[1] - rows[0]
                    targets.append(Target(f"{d_kind}.{n}.{d_module}", key, rows, (size, inp)))
        return targets

    def kohya_module(self, target: Target) -> tuple[str, tuple[int, int] | None, int]:
        module = target.key
        for prefix in _PREFIXES:
            if prefix and module.startswith(prefix):
                module = module[len(prefix):]
                break
        if not module.endswith(".weight"):
            raise ValueError(f"not a FLUX weight key: {target.key!r}")
        module = module[: -len(".weight")]
        name = "lora_unet_" + module.replace(".", "_")
        if target.rows is None:
            return name, None, target.out_features
        hidden = target.in_features
        if module.endswith(".qkv"):
            full = 3 * hidden
        elif target.rows[0] >= 3 * hidden:  # the MLP slice of linear1 ends the weight
            full = target.rows[1]
        else:
            full = 3 * hidden + MLP_RATIO * hidden
        return name, target.rows, full


def _shape2(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, int]:
    if key not in shapes:
        raise ValueError(f"FLUX checkpoint lacks {key}")
    shape = tuple(shapes[key])
    if len(shape) != 2:
        raise ValueError(
            f"{key}: expected a 2-D linear weight, got shape {list(shape)} (quantized files are not supported)"
        )
    return shape[0], shape[1]


def _check_fused_widths(shapes: Mapping[str, Sequence[int]], block: str, kind: str) -> None:
    """The row split of the fused weights assumes q/k/v as wide as the stream; check it."""
    if kind == _DOUBLE:
        for stream in ("img", "txt"):
            out, inp = _shape2(shapes, f"{block}{stream}_attn.qkv.weight")
            if out != 3 * inp:
                raise ValueError(f"{block}{stream}_attn.qkv.weight: {out} rows, expected 3 x {inp}")
        return
    out1, hidden = _shape2(shapes, f"{block}linear1.weight")
    out2, in2 = _shape2(shapes, f"{block}linear2.weight")
    mlp = out1 - 3 * hidden
    # linear2 reads cat(attention output, MLP activations): hidden + mlp columns.
    if mlp != MLP_RATIO * hidden or in2 != hidden + mlp or out2 != hidden:
        raise ValueError(
            f"{block}linear1/linear2: shapes {[out1, hidden]}/{[out2, in2]} do not fit FLUX's "
            f"[3H + {MLP_RATIO}H, H]/[H, H + {MLP_RATIO}H]"
        )


# ------------------------------------------------------------------ full conversion
def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict in the BFL layout (no prefix).

    Fused weights are concatenated in slot order; every other tensor is renamed and shared
    with the input. Works on meta tensors too (for shape-only maps). Unknown keys raise.
    """
    out: dict[str, torch.Tensor] = {}
    for bfl_key, parts in bfl_sources(state_dict).items():
        out[bfl_key] = _assemble(bfl_key, [state_dict[k] for k in parts])
    return out


def bfl_sources(keys: Collection[str]) -> dict[str, list[str]]:
    """BFL key -> the diffusers keys it is made of, in row order (one key unless fused)."""
    lookup = _diffusers_lookup(keys)
    fused: dict[str, dict[int, str]] = {}
    out: dict[str, list[str]] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module not in lookup:
            raise ValueError(f"diffusers_to_bfl: no BFL name for FLUX transformer key {key!r}")
        bfl_module, slot = lookup[module]
        if param == "weight" and bfl_module.endswith("_norm"):
            param = "scale"
        bfl_key = f"{bfl_module}.{param}"
        if slot is None:
            out[bfl_key] = [key]
        else:
            fused.setdefault(bfl_key, {})[slot] = key
    for bfl_key, parts in fused.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"diffusers_to_bfl: {bfl_key} is missing row blocks (have slots {sorted(parts)})")
        out[bfl_key] = [parts[i] for i in range(len(parts))]
    return out


def _assemble(bfl_key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The BFL tensor from its diffusers parts (see ``bfl_sources``)."""
    if len(tensors) > 1:
        return torch.cat(list(tensors), dim=0)
    tensor = tensors[0]
    if bfl_key.startswith(_SWAPPED_BFL):
        first, second = tensor.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    return tensor


class DiffusersFolder:
    """A diffusers ``FluxTransformer2DModel`` folder (one file or shards) read as a BFL single
    file without prefix: the same keys, shapes, dtypes and, row for row, the same tensors, so a
    basis made from it is the basis (same id) of the BFL file holding the same weights. The
    fused weights are assembled from their parts on demand. ``SafetensorsFile``'s interface."""

    def __init__(self, folder: str, shards):
        self.path = folder
        self.shards = shards
        self.sources = bfl_sources(shards.keys)

    @property
    def keys(self) -> list[str]:
        return list(self.sources)

    def shape(self, key: str) -> tuple[int, ...]:
        parts = [self.shards.shape(k) for k in self._parts(key)]
        return (sum(p[0] for p in parts), *parts[0][1:]) if len(parts) > 1 else parts[0]

    def dtype_name(self, key: str) -> str:
        return self.shards.dtype_name(self._parts(key)[0])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.sources}

    def tensor(self, key: str) -> torch.Tensor:
        return _assemble(key, [self.shards.tensor(k) for k in self._parts(key)])

    def files_and_keys(self, keys: Collection[str]) -> dict[str, tuple[object, list[str]]]:
        """{shard path: (shard, its diffusers keys)} holding the parts of these BFL keys: what a
        content fingerprint of the folder reads."""
        out: dict[str, tuple[object, list[str]]] = {}
        for key in keys:
            for part in self._parts(key):
                shard = self.shards.file_of(part)
                out.setdefault(shard.path, (shard, []))[1].append(part)
        return out

    def _parts(self, key: str) -> list[str]:
        if key not in self.sources:
            from ..checkpoint import FileFormatError

            raise FileFormatError(f"{self.path}: no tensor for {key!r} (as a BFL key)")
        return self.sources[key]


def open_diffusers_folder(path: str) -> DiffusersFolder | None:
    """``path`` (a diffusers FLUX pipeline folder or its ``transformer`` folder) as a BFL
    file, or None when its ``config.json`` does not name ``FluxTransformer2DModel``."""
    import json
    import os

    from ..checkpoint import FileFormatError, SafetensorsShards

    for folder in (os.path.join(path, "transformer"), path):
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict) or config.get("_class_name") != "FluxTransformer2DModel":
            continue
        shards = SafetensorsShards(folder)
        if "transformer_blocks.0.attn.to_q.weight" not in shards.keys:
            raise FileFormatError(f"{folder}: config.json names FluxTransformer2DModel but the weights have no"
                                  " transformer_blocks.0.attn.to_q.weight")
        try:
            return DiffusersFolder(folder, shards)
        except ValueError as e:
            raise FileFormatError(f"{folder}: {e}") from None
    return None


def _diffusers_lookup(keys: Collection[str]) -> dict[str, tuple[str, int | None]]:
    """diffusers module path -> (BFL module path, slot), for the blocks present in ``keys``."""
    lookup: dict[str, tuple[str, int | None]] = {d: (b, None) for d, b in OUTER}
    for d_kind, kind, table, norms in (
        ("transformer_blocks", _DOUBLE, DOUBLE_BLOCK, DOUBLE_BLOCK_NORMS),
        ("single_transformer_blocks", _SINGLE, SINGLE_BLOCK, SINGLE_BLOCK_NORMS),
    ):
        for n in _block_indices(keys, "", d_kind):
            for d_module, bfl_module, slot in table:
                lookup[f"{d_kind}.{n}.{d_module}"] = (f"{kind}.{n}.{bfl_module}", slot)
            for d_module, bfl_module in norms:
                lookup[f"{d_kind}.{n}.{d_module}"] = (f"{kind}.{n}.{bfl_module}", None)
    return lookup


register(Flux())
