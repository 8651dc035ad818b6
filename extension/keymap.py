"""Where a target (``shared.archs.Target``: layout-independent name, original-layout key,
row slice) lives in each host's in-memory model.

A1111 (v1.10 ``extensions-builtin/Lora/networks.py``: ``assign_network_names_to_compvis_modules``):
every module of ``sd_model.model`` is named by its path with ``.`` → ``_``
(``diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), every module of the
SDXL ``conditioner.embedders[i].wrapped`` by ``f"{i}_"`` + its path
(``0_transformer_text_model_encoder_layers_0_self_attn_q_proj``,
``1_model_transformer_resblocks_0_attn``). The wrapped embedders hold exactly what the SGM
checkpoint stores under ``conditioner.embedders.{i}.``, so the name follows from the key.
OpenCLIP's q/k/v are row blocks of one ``nn.MultiheadAttention.in_proj_weight``; Lora's
``network_apply_weights`` merges them from modules keyed ``<mha layer>_q_proj`` / ``_k_proj`` /
``_v_proj`` plus ``_out_proj`` (all four, or none).

Forge (``backend/patcher/base.py``: ``ModelPatcher.add_patches`` keys are parameter names
of the patched model): the UNet/transformer patcher's model is a ``KModel`` whose
``diffusion_model`` is the SGM UNet or BFL transformer, so parameters are
``diffusion_model.<original path>.weight``; the CLIP patcher's model is a ``JointTextEncoder``
with Hugging Face text models ``clip_l`` / ``clip_g`` (``clip_g.transformer.text_model.…``,
as ``packages_3rdparty/comfyui_lora_collection/lora.py``: ``model_lora_keys_clip`` names
them), so TE2 has separate q/k/v there. A row slice becomes ``(name, (0, start, length))``.
"""

from __future__ import annotations

from dataclasses import dataclass

UNET_SGM_PREFIX = "model."  # SGM "model.diffusion_model.X" is sd_model.model's "diffusion_model.X"
EMBEDDERS = "conditioner.embedders."
_QKV = ("q", "k", "v")
TEXT_ENCODERS = {"te1": "clip_l", "te2": "clip_g"}


@dataclass(frozen=True)
class A1111Layer:
    network_key: str  # key of the module in Network.modules (what network_apply_weights looks up)
    layer_name: str  # the torch module's network_layer_name
    qkv: int | None  # 0/1/2 when the target is a row block of an MHA in_proj_weight


def a1111_layer(target) -> A1111Layer:
    key = target.key
    if key.startswith(UNET_SGM_PREFIX + "diffusion_model."):
        path = key[len(UNET_SGM_PREFIX):]
    elif key.startswith(EMBEDDERS):
        index, _, rest = key[len(EMBEDDERS):].partition(".")
        path = f"{index}_{rest}"
    else:
        raise KeyError(f"{target.name}: {key!r} is not an SGM SDXL key")
    if path.endswith(".in_proj_weight"):
        module = path[: -len(".in_proj_weight")].replace(".", "_")
        if not target.rows:
            raise KeyError(f"{target.name}: the whole in_proj_weight is not one layer")
        start, stop = target.rows
        block = start // (stop - start)
        return A1111Layer(f"{module}_{_QKV[block]}_proj", module, block)
    if not path.endswith(".weight"):
        raise KeyError(f"{target.name}: {key!r} is not a weight")
    module = path[: -len(".weight")].replace(".", "_")
    return A1111Layer(module, module, None)


@dataclass(frozen=True)
class ForgeParam:
    component: str  # "unet" (UnetPatcher) or "clip" (CLIP patcher)
    name: str  # parameter name in that patcher's model
    offset: tuple[int, int, int] | None  # (dim, start, length) of a row slice

    @property
    def patch_key(self):
        return self.name if self.offset is None else (self.name, self.offset)


def forge_param(target, arch: str) -> ForgeParam:
    component = target.name.split(".", 1)[0]
    if component in TEXT_ENCODERS:  # Hugging Face layout in Forge: TE2's q/k/v are separate layers
        rest = target.name[len(component) + 1:]
        return ForgeParam("clip", f"{TEXT_ENCODERS[component]}.transformer.{rest}.weight", None)
    key = target.key
    if key.startswith(UNET_SGM_PREFIX + "diffusion_model."):
        name = key[len(UNET_SGM_PREFIX):]
    elif key.startswith("diffusion_model."):
        name = key
    elif arch == "flux":  # BFL transformer files store bare keys
        name = "diffusion_model." + key
    else:
        raise KeyError(f"{target.name}: no Forge parameter for {key!r}")
    offset = None
    if target.rows:
        offset = (0, target.rows[0], target.rows[1] - target.rows[0])
    return ForgeParam("unet", name, offset)


def is_text_encoder(name: str) -> bool:
    return name.split(".", 1)[0] in TEXT_ENCODERS
