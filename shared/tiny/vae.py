"""diffusers ``AutoencoderKL`` state dict -> the original LDM VAE layout.

Real checkpoints store the VAE in the layout of the original latent-diffusion code
(``first_stage_model.*`` inside an SDXL file, bare keys in FLUX's ``ae.safetensors``), so
the tiny writers build a diffusers VAE and rename its weights back. This is written as the
exact inverse of diffusers' ``convert_ldm_vae_checkpoint``; the tests check the round trip.

Layout differences handled here:
- ``down_blocks.i.resnets.j`` <-> ``down.i.block.j`` and ``downsamplers.0`` <-> ``downsample``;
- the decoder's up blocks are numbered in reverse: diffusers ``up_blocks.i`` is LDM
  ``up.{n-1-i}`` (diffusers numbers them in execution order; LDM numbers them by resolution
  level, ``up.0`` being the full-resolution one like ``down.0``, and runs them last to first);
- ``mid_block.resnets.{0,1}`` <-> ``mid.block_{1,2}``, ``mid_block.attentions.0`` <-> ``mid.attn_1``
  whose q/k/v/proj_out are 1x1 convolutions ([C, C, 1, 1]) in LDM and linears in diffusers;
- ``conv_shortcut`` <-> ``nin_shortcut``, ``conv_norm_out`` <-> ``norm_out``.
"""

from __future__ import annotations

import re

_UP_BLOCK = re.compile(r"^decoder\.up_blocks\.(\d+)\.")
_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# (diffusers pattern, LDM replacement) for everything except the decoder's up blocks,
# whose index needs the block count. Anchored, so each key matches at most one rule.
_RULES = [
    (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)$"), r"\1.\2.\3"),
    (re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\.(weight|bias)$"), r"\1.norm_out.\2"),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$"), r"encoder.down.\1.block.\2.\3"),
    (
        re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$"),
        r"encoder.down.\1.downsample.conv.\2",
    ),
]
_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$")
_MID_ATTN = re.compile(
    r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$"
)
_UP_RESNET = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_UP_SAMPLE = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$")


def vae_diffusers_to_ldm(state_dict: dict) -> dict:
    """Rename a diffusers ``AutoencoderKL`` state dict to the LDM VAE layout (no prefix).

    Tensors are shared with the input (no copy); the mid-block attention weights become views
    with the two trailing 1x1 dimensions of the LDM convolutions. Unknown keys raise ``ValueError``
    rather than being dropped, so a new diffusers layout cannot silently lose weights.
    """
    up_indices = {int(m.group(1)) for k in state_dict if (m := _UP_BLOCK.match(k))}
    n_up = max(up_indices) + 1 if up_indices else 0

    out = {}
    for key, tensor in state_dict.items():
        new_key = _ldm_key(key, n_up)
        if new_key is None:
            raise ValueError(f"vae_diffusers_to_ldm: no LDM name for diffusers VAE key {key!r}")
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and not new_key.endswith(".norm.weight"):
            # LDM's AttnBlock uses Conv2d(C, C, 1) for q, k, v and proj_out.
            tensor = tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor
        out[new_key] = tensor
    return out


def _ldm_key(key: str, n_up: int) -> str | None:
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return _shortcut(pattern.sub(replacement, key))
    if m := _MID_RESNET.match(key):
        part, j, rest = m.groups()
        return _shortcut(f"{part}.mid.block_{int(j) + 1}.{rest}")
    if m := _MID_ATTN.match(key):
        part, name, kind = m.groups()
        return f"{part}.mid.attn_1.{_ATTN_NAMES[name]}.{kind}"
    if m := _UP_RESNET.match(key):
        i, j, rest = m.groups()
        return _shortcut(f"decoder.up.{n_up - 1 - int(i)}.block.{j}.{rest}")
    if m := _UP_SAMPLE.match(key):
        i, kind = m.groups()
        return f"decoder.up.{n_up - 1 - int(i)}.upsample.conv.{kind}"
    return None


def _shortcut(key: str) -> str:
    # Resnets whose channel count changes carry a 1x1 shortcut conv; LDM calls it nin_shortcut.
    return key.replace(".conv_shortcut.", ".nin_shortcut.")

