"""SDXL: its targetable linears and the names they have in each layout.

The WebUIs and users hold SGM single-file checkpoints (``model.diffusion_model.*`` for the
UNet, ``conditioner.embedders.0.transformer.*`` for CLIP-L in Hugging Face layout,
``conditioner.embedders.1.model.*`` for OpenCLIP bigG, ``first_stage_model.*`` for the VAE).
Our layout-independent names are diffusers / transformers module paths:
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``,
``te1.text_model.encoder.layers.3.self_attn.q_proj``, ``te2.text_model.encoder.layers.3.mlp.fc1``.

``UNetLayout`` is the one diffusers <-> SGM map of the whole UNet. Its index arithmetic needs
only the number of levels, the res blocks per level and which up blocks carry attention, all
read off the keys, so distilled or re-shaped SDXL variants work without constants.
Inside a transformer (``Transformer2DModel`` / ``SpatialTransformer``) both layouts use the
same module names; only the block prefix differs.

Runs inside the WebUIs (Python 3.10): standard library only, not even torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence

from . import Architecture, Target, register

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."  # HF CLIPTextModel keys follow
TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP text tower keys follow

# A1111 picks its SDXL config when this key is present (the refiner has embedders.0.model).
_SDXL_MARKER = TE2_PREFIX + "ln_final.weight"

# Module paths that are the same block in both layouts, wherever they sit.
_UNET_FIXED = (
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
# diffusers ResnetBlock2D child -> SGM ResBlock child (SGM keeps nn.Sequential indices).
_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)

# A transformer's children, the same in both layouts (Transformer2DModel / SpatialTransformer).
_TRANSFORMER_CHILDREN = ("norm", "proj_in", "transformer_blocks", "proj_out")

# The linears kohya targets inside a transformer: proj_in/proj_out and, per block, the two
# attentions and the feed-forward. The path before it is the (SGM) transformer's prefix.
_UNET_LINEAR = re.compile(
    r"\.(?:proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|ff\.net\.(?:0\.proj|2)))\.weight$"
)

# Text-encoder linears, in forward order, as HF CLIP names them inside one encoder layer.
TE_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

# HF CLIPTextModelWithProjection -> OpenCLIP text tower (TE2), outside the encoder layers...
_TE2_TOP = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm", "ln_final"),
    ("text_projection.weight", "text_projection"),  # stored transposed by OpenCLIP (x @ P)
)
# ...and inside one (``resblocks.N``). q/k/v are fused into nn.MultiheadAttention's in_proj.
_TE2_LAYER = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_TE2_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")

# Sort ranks that put SGM paths into forward order (numbers sort numerically).
_ORDER = {
    "input_blocks": 0, "middle_block": 1, "output_blocks": 2,
    "proj_in": 0, "transformer_blocks": 1, "proj_out": 2,
    "attn1": 0, "attn2": 1, "ff": 2,
    "to_q": 0, "to_k": 1, "to_v": 2, "to_out": 3,
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _swap(name: str, pairs: Iterable[tuple[str, str]], reverse: bool = False) -> str | None:
    """Replace the leading dotted prefix of ``name`` by its partner in ``pairs``; None if none fits."""
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        if _under(name, src):
            return dst + name[len(src):]
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class UNetLayout:
    """What the diffusers <-> SGM index arithmetic needs to know about one UNet.

    In SGM, ``input_blocks`` is a flat list: conv_in, then per level ``layers_per_block``
    [ResBlock, SpatialTransformer?] entries and one Downsample (none after the last level).
    ``output_blocks`` has ``layers_per_block + 1`` entries per level, the last of which also
    holds the Upsample, in slot 2 after an attention or slot 1 when the level has none.
    """

    levels: int
    layers_per_block: int
    up_attentions: tuple[bool, ...]  # per diffusers up block: does it have attentions?

    @property
    def _stride(self) -> int:
        return self.layers_per_block + 1

    @classmethod
    def from_sgm_keys(cls, keys: Iterable[str]) -> "UNetLayout":
        """From SGM UNet keys, bare or with the ``model.diffusion_model.`` prefix (others are ignored)."""
        inputs, downsamplers, outputs, out_attn = set(), set(), set(), set()
        for key in keys:
            if key.startswith(UNET_PREFIX):
                key = key[len(UNET_PREFIX):]
            parts = key.split(".")
            if len(parts) < 4 or not parts[1].isdigit():
                continue
            i = int(parts[1])
            if parts[0] == "input_blocks":
                inputs.add(i)
                if parts[2:4] == ["0", "op"]:
                    downsamplers.add(i)
            elif parts[0] == "output_blocks":
                outputs.add(i)
                if parts[2] == "1" and parts[3] != "conv":  # slot 1 is an attention unless it is the Upsample
                    out_attn.add(i)
        if not inputs:
            raise ValueError("not an SGM UNet: no input_blocks keys")
        # The first Downsample closes level 0, so its index is layers_per_block + 1.
        stride = min(downsamplers) if downsamplers else max(inputs) + 1
        levels = len(downsamplers) + 1
        if (
            stride < 2
            or downsamplers != {stride * (b + 1) for b in range(levels - 1)}
            or inputs != set(range(levels * stride))
            or outputs != set(range(levels * stride))
        ):
            raise ValueError(
                "SGM UNet layout not understood (only the same number of res blocks on every level is "
                f"supported): input_blocks {sorted(inputs)}, downsamplers at {sorted(downsamplers)}, "
                f"output_blocks {sorted(outputs)}"
            )
        up_attn = tuple(b * stride in out_attn for b in range(levels))
        return cls(levels, stride - 1, up_attn)

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> "UNetLayout":
        """From diffusers ``UNet2DConditionModel`` state-dict keys or module names."""
        down, down_res, up_res, up_attn = set(), set(), {}, set()
        for key in keys:
            parts = key.split(".")
            if len(parts) < 4 or not parts[1].isdigit():
                continue
            b = int(parts[1])
            if parts[0] == "down_blocks":
                down.add(b)
                if b == 0 and parts[2] == "resnets":
                    down_res.add(int(parts[3]))
            elif parts[0] == "up_blocks":
                if parts[2] == "resnets":
                    up_res.setdefault(b, set()).add(int(parts[3]))
                elif parts[2] == "attentions":
                    up_attn.add(b)
        if not down or not down_res:
            raise ValueError("not a diffusers UNet: no down_blocks.N.resnets keys")
        levels, lpb = max(down) + 1, max(down_res) + 1
        if any(up_res.get(b) != set(range(lpb + 1)) for b in range(levels)):
            raise ValueError(f"diffusers UNet with {lpb} resnets per down block but up blocks {up_res}")
        return cls(levels, lpb, tuple(b in up_attn for b in range(levels)))

    # ------------------------------------------------------------------ diffusers -> SGM
    def to_sgm(self, name: str) -> str:
        """diffusers module path or parameter key -> the SGM one (no ``model.diffusion_model.`` prefix)."""
        fixed = _swap(name, _UNET_FIXED)
        if fixed is not None:
            return fixed
        parts = name.split(".")
        try:
            if parts[0] == "mid_block":
                kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
                if kind == "resnets":
                    return _join(f"middle_block.{2 * j}", _resnet(rest, name))
                if kind == "attentions":
                    return _join(f"middle_block.{2 * j + 1}", _transformer(rest, name))
            elif parts[0] in ("down_blocks", "up_blocks"):
                b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                if b < self.levels:
                    if parts[0] == "down_blocks":
                        return self._down_to_sgm(b, kind, j, rest, name)
                    return self._up_to_sgm(b, kind, j, rest, name)
        except (IndexError, ValueError):
            pass
        raise ValueError(f"no SGM name for diffusers UNet module {name!r}")

    def _down_to_sgm(self, b: int, kind: str, j: int, rest: str, name: str) -> str:
        first = 1 + b * self._stride  # input_blocks.0 is conv_in
        if kind in ("resnets", "attentions") and j < self.layers_per_block:
            if kind == "resnets":
                return _join(f"input_blocks.{first + j}.0", _resnet(rest, name))
            return _join(f"input_blocks.{first + j}.1", _transformer(rest, name))
        if kind == "downsamplers" and j == 0 and _under(rest, "conv") and b < self.levels - 1:
            return _join(f"input_blocks.{first + self.layers_per_block}.0.op", rest[len("conv."):])
        raise ValueError(name)

    def _up_to_sgm(self, b: int, kind: str, j: int, rest: str, name: str) -> str:
        first = b * self._stride
        if kind == "resnets" and j < self._stride:
            return _join(f"output_blocks.{first + j}.0", _resnet(rest, name))
        if kind == "attentions" and j < self._stride and self.up_attentions[b]:
            return _join(f"output_blocks.{first + j}.1", _transformer(rest, name))
        if kind == "upsamplers" and j == 0 and _under(rest, "conv") and b < self.levels - 1:
            slot = 2 if self.up_attentions[b] else 1
            return _join(f"output_blocks.{first + self.layers_per_block}.{slot}.conv", rest[len("conv."):])
        raise ValueError(name)

    # ------------------------------------------------------------------ SGM -> diffusers
    def to_diffusers(self, name: str) -> str:
        """SGM module path or parameter key (no prefix) -> the diffusers one."""
        fixed = _swap(name, _UNET_FIXED, reverse=True)
        if fixed is not None:
            return fixed
        parts = name.split(".")
        try:
            if parts[0] == "middle_block":
                k, rest = int(parts[1]), ".".join(parts[2:])
                if k % 2 == 0:
                    return _join(f"mid_block.resnets.{k // 2}", _resnet(rest, name, reverse=True))
                return _join(f"mid_block.attentions.{k // 2}", _transformer(rest, name))
            if parts[0] in ("input_blocks", "output_blocks"):
                i, slot, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
                if parts[0] == "input_blocks":
                    return self._input_to_diffusers(i, slot, rest, name)
                return self._output_to_diffusers(i, slot, rest, name)
        except (IndexError, ValueError):
            pass
        raise ValueError(f"no diffusers name for SGM UNet module {name!r}")

    def _input_to_diffusers(self, i: int, slot: int, rest: str, name: str) -> str:
        b, j = divmod(i - 1, self._stride)
        if i < 1 or b >= self.levels:
            raise ValueError(name)
        if j == self.layers_per_block:  # the Downsample entry, on every level but the last
            if slot == 0 and _under(rest, "op") and b < self.levels - 1:
                return _join(f"down_blocks.{b}.downsamplers.0.conv", rest[len("op."):])
        elif slot == 0:
            return _join(f"down_blocks.{b}.resnets.{j}", _resnet(rest, name, reverse=True))
        elif slot == 1:
            return _join(f"down_blocks.{b}.attentions.{j}", _transformer(rest, name))
        raise ValueError(name)

    def _output_to_diffusers(self, i: int, slot: int, rest: str, name: str) -> str:
        b, j = divmod(i, self._stride)
        if b >= self.levels:
            raise ValueError(name)
        if slot == 0:
            return _join(f"up_blocks.{b}.resnets.{j}", _resnet(rest, name, reverse=True))
        upsample_slot = 2 if self.up_attentions[b] else 1
        last = j == self.layers_per_block and b < self.levels - 1  # the final up block has no Upsample
        if last and slot == upsample_slot and _under(rest, "conv"):
            return _join(f"up_blocks.{b}.upsamplers.0.conv", rest[len("conv."):])
        if slot == 1 and self.up_attentions[b]:
            return _join(f"up_blocks.{b}.attentions.{j}", _transformer(rest, name))
        raise ValueError(name)


def _transformer(rest: str, name: str) -> str:
    # Inside a transformer both layouts agree; still refuse what no SDXL transformer holds.
    if rest and rest.split(".", 1)[0] not in _TRANSFORMER_CHILDREN:
        raise ValueError(name)
    return rest


def _resnet(rest: str, name: str, reverse: bool = False) -> str:
    out = _swap(rest, _RESNET, reverse) if rest else ""
    if out is None:
        raise ValueError(name)
    return out


def te2_hf_to_openclip(key: str) -> tuple[str, int | None]:
    """HF ``CLIPTextModelWithProjection`` key -> (OpenCLIP key without prefix, q/k/v block).

    The block is 0/1/2 when the tensor is that row block of the fused ``attn.in_proj_weight``
    (or ``in_proj_bias``), else None. ``text_projection`` is the transpose of HF's weight.
    """
    top = _swap(key, _TE2_TOP)
    if top is not None:
        return top, None
    m = _HF_LAYER.match(key)
    if m:
        n, rest = m.groups()
        parts = rest.split(".")
        if len(parts) == 3 and parts[0] == "self_attn" and parts[1] in _TE2_QKV and parts[2] in ("weight", "bias"):
            return f"transformer.resblocks.{n}.attn.in_proj_{parts[2]}", _TE2_QKV[parts[1]]
        inner = _swap(rest, _TE2_LAYER)
        if inner is not None:
            return f"transformer.resblocks.{n}.{inner}", None
    raise ValueError(f"no OpenCLIP name for text encoder 2 key {key!r}")


def _layer_indices(keys: Iterable[str], prefix: str) -> list[int]:
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _forward_order(path: str) -> tuple:
    return tuple((int(p), "") if p.isdigit() else (_ORDER.get(p, 99), p) for p in path.split("."))


_ATTN = ("unet.*.attn[12].to_[qkv]", "unet.*.attn[12].to_out.0")


class SDXL(Architecture):
    name = "sdxl"
    title = "SDXL"
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    resolution = "1024x1024"
    presets = {
        # every attention projection of every UNet transformer block (560 on SDXL base)
        "sdxl-attn": _ATTN,
        # kohya's default UNet set: also the feed-forward and each transformer's proj_in/out (722)
        "sdxl-all": _ATTN + ("unet.*.ff.net.0.proj", "unet.*.ff.net.2", "unet.*.proj_in", "unet.*.proj_out"),
        # both text encoders' attention and MLP linears (72 + 192)
        "sdxl-te": ("te[12].*.self_attn.[qkv]_proj", "te[12].*.self_attn.out_proj", "te[12].*.mlp.fc[12]"),
    }
    default_preset = "sdxl-all"
    diffusers_components = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}

    def detect(self, keys: Collection[str]) -> bool:
        return _SDXL_MARKER in keys and any(k.startswith(UNET_PREFIX) for k in keys)

    def linear_targets(self, shapes: Mapping[str, Sequence[int]]) -> list[Target]:
        return self._unet_targets(shapes) + self._te1_targets(shapes) + self._te2_targets(shapes)

    def _unet_targets(self, shapes: Mapping[str, Sequence[int]]) -> list[Target]:
        keys = [k for k in shapes if k.startswith(UNET_PREFIX)]
        if not keys:
            return []
        layout = UNetLayout.from_sgm_keys(keys)
        found = []
        for key in keys:
            path = key[len(UNET_PREFIX):]
            # 4-D proj_in/proj_out are the 1x1 convs of non-linear-projection UNets: not Linear.
            if _UNET_LINEAR.search(path) and len(shapes[key]) == 2:
                module = path[: -len(".weight")]
                found.append(Target("unet." + layout.to_diffusers(module), key, None, _shape2(shapes[key])))
        return sorted(found, key=lambda t: _forward_order(t.key[len(UNET_PREFIX):]))

    def _te1_targets(self, shapes: Mapping[str, Sequence[int]]) -> list[Target]:
        layers = TE1_PREFIX + "text_model.encoder.layers."
        out = []
        for n in _layer_indices(shapes, layers):
            for linear in TE_LINEARS:
                key = f"{layers}{n}.{linear}.weight"
                if key in shapes:
                    out.append(Target(f"te1.text_model.encoder.layers.{n}.{linear}", key, None, _shape2(shapes[key])))
        return out

    def _te2_targets(self, shapes: Mapping[str, Sequence[int]]) -> list[Target]:
        out = []
        for n in _layer_indices(shapes, TE2_PREFIX + "transformer.resblocks."):
            for linear in TE_LINEARS:
                hf = f"text_model.encoder.layers.{n}.{linear}"
                sub, block = te2_hf_to_openclip(hf + ".weight")
                key = TE2_PREFIX + sub
                if key not in shapes:
                    continue
                rows_total, cols = _shape2(shapes[key])
                if block is None:
                    out.append(Target("te2." + hf, key, None, (rows_total, cols)))
                else:
                    d = rows_total // 3
                    if d * 3 != rows_total:
                        raise ValueError(f"{key}: {rows_total} rows is not three q/k/v blocks")
                    out.append(Target("te2." + hf, key, (block * d, (block + 1) * d), (d, cols)))
        return out

    def kohya_module(self, target: Target) -> tuple[str, tuple[int, int] | None, int]:
        if target.name.startswith("unet.") and target.key.startswith(UNET_PREFIX):
            # kohya's SDXL UNet is the SGM one, so its module names are the SGM paths.
            module = target.key[len(UNET_PREFIX): -len(".weight")]
            return "lora_unet_" + module.replace(".", "_"), None, target.out_features
        for part in ("te1", "te2"):  # kohya trains both text encoders in HF form
            if target.name.startswith(part + "."):
                return f"lora_{part}_" + target.name[len(part) + 1:].replace(".", "_"), None, target.out_features
        raise ValueError(f"not an SDXL target: {target.name!r}")


def _shape2(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


register(SDXL())
