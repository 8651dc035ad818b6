"""A tiny random SDXL, written as the SGM single file users have (``sd_xl_base_1.0.safetensors``).

Same structure as SDXL base at toy widths: three UNet levels (DownBlock2D, then two
CrossAttnDownBlock2D, mirrored on the way up) with 2 res blocks each, transformer depth
growing per level (1, 1, 2) like SDXL's (1, 2, 10), a cross-attention mid block, linear
projections, the "text_time" added conditioning; CLIP-L and OpenCLIP-bigG stand-ins with the
full 49,408-token vocabulary, so the real CLIP BPE tokenizer works on them; a two-level VAE.

Weights are stored in fp16, as in the released SDXL files: the full-vocabulary token
embeddings dominate the size (49,408 x 64 values), and fp16 keeps the file under 8 MB.
``build_components`` returns fp32 modules whose values are exactly those fp16 numbers, so the
file and the modules agree bit for bit after an upcast.

Every tensor is drawn by us from one seeded generator in name order (no library
initialiser), so the bytes depend only on the seed and the parameter names, and no two
tensors repeat each other's values (norm weights are 1 + noise, biases small noise): a key
swapped by a converter cannot go unnoticed.
"""

from __future__ import annotations

import math
import os

import torch

from ..archs.sdxl import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, UNetLayout, te2_hf_to_openclip
from ..checkpoint import save_atomic
from . import TinyModel
from .vae import vae_diffusers_to_ldm

CHECKPOINT_NAME = "tiny-sdxl.safetensors"
VAE_PREFIX = "first_stage_model."
STORE_DTYPE = torch.float16

TE1_HIDDEN, TE2_HIDDEN, TIME_DIM = 32, 32, 8

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(8, 16, 32),  # SDXL's 320/640/1280 ratios
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 4),  # diffusers' name for the head count; head width 8
    norm_num_groups=4,
    cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,  # the two encoders' hidden states, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    # 6 micro-conditioning numbers (size, crop, target size), each embedded, + pooled TE2 output
    projection_class_embeddings_input_dim=6 * TIME_DIM + TE2_HIDDEN,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.13025,  # SDXL's
    force_upcast=True,
)
# Token ids and activations as in SDXL base's text_encoder / text_encoder_2 configs.
_CLIP_COMMON = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    num_attention_heads=4,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
TE1_CONFIG = dict(
    _CLIP_COMMON, architectures=["CLIPTextModel"], hidden_size=TE1_HIDDEN, num_hidden_layers=2,
    intermediate_size=4 * TE1_HIDDEN, hidden_act="quick_gelu", projection_dim=TE1_HIDDEN,
)
TE2_CONFIG = dict(
    _CLIP_COMMON, architectures=["CLIPTextModelWithProjection"], hidden_size=TE2_HIDDEN, num_hidden_layers=3,
    intermediate_size=4 * TE2_HIDDEN, hidden_act="gelu", projection_dim=TE2_HIDDEN,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def build_components(seed: int) -> dict:
    """Fresh fp32 diffusers/transformers modules holding the tiny model's weights for ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):  # the libraries' own init must not move the caller's RNG
        components = {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "vae": AutoencoderKL(**VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**TE1_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CONFIG)),
        }
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in COMPONENTS:
            module = components[name].eval()
            for pname, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
                param.copy_(_draw(pname, param.shape, generator))
    return components


def _draw(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) >= 2:  # linear / conv / embedding: variance-preserving over the fan-in
        value = noise / math.sqrt(math.prod(shape[1:]))
    elif name.endswith("weight"):  # the only 1-D weights are norm scales: near 1
        value = 1 + 0.1 * noise
    else:  # biases: near 0
        value = 0.02 * noise
    return value.to(STORE_DTYPE).to(torch.float32)


def sgm_state_dict(unet: dict, text_encoder: dict, text_encoder_2: dict, vae: dict | None = None) -> dict:
    """diffusers/transformers state dicts -> one SGM-layout state dict (tensors not copied
    where no reshaping is needed; meta tensors work, for shape-only uses)."""
    layout = UNetLayout.from_diffusers_keys(unet)
    out = {UNET_PREFIX + layout.to_sgm(key): value for key, value in unet.items()}
    if len(out) != len(unet):
        raise AssertionError("two diffusers UNet keys map to one SGM key")
    text_encoder, text_encoder_2 = clip_checkpoint_keys(text_encoder), clip_checkpoint_keys(text_encoder_2)
    for key, value in text_encoder.items():
        out[TE1_PREFIX + key] = value
    # Real SDXL files carry TE1's position ids (transformers once saved that buffer).
    n_pos = text_encoder["text_model.embeddings.position_embedding.weight"].shape[0]
    out.setdefault(TE1_PREFIX + "text_model.embeddings.position_ids", torch.arange(n_pos, dtype=torch.int64)[None])
    out.update(_te2_to_openclip(text_encoder_2))
    if vae is not None:
        out.update({VAE_PREFIX + k: v for k, v in vae_diffusers_to_ldm(vae).items()})
    return out


def clip_checkpoint_keys(state_dict: dict) -> dict:
    """A CLIP text model's state dict with the keys its checkpoints use (``text_model.*``).

    transformers 5 dropped the ``text_model`` wrapper from ``CLIPTextModel`` (its state dict
    says ``encoder.layers.0...``, and loading re-adds/strips the prefix), while
    ``CLIPTextModelWithProjection`` and every file on disk keep it. Accepts either form.
    """
    keep = ("text_model.", "text_projection")
    return {k if k.startswith(keep) else "text_model." + k: v for k, v in state_dict.items()}


def _te2_to_openclip(sd: dict) -> dict:
    out, fused = {}, {}
    for key, value in sd.items():
        if key.endswith("position_ids"):  # a buffer OpenCLIP does not have
            continue
        sub, block = te2_hf_to_openclip(key)
        if block is not None:
            fused.setdefault(sub, [None, None, None])[block] = value
        elif sub == "text_projection":
            out[TE2_PREFIX + sub] = value.T.contiguous()  # OpenCLIP computes pooled @ text_projection
        else:
            out[TE2_PREFIX + sub] = value
    for sub, blocks in fused.items():
        if any(b is None for b in blocks):
            raise ValueError(f"text encoder 2: {sub} is missing one of q/k/v")
        out[TE2_PREFIX + sub] = torch.cat(blocks, dim=0)
    # OpenCLIP's contrastive temperature; unused for generation but present in real SDXL files.
    out[TE2_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def make(out_dir: str, seed: int = 0) -> TinyModel:
    """Write ``tiny-sdxl.safetensors`` and ``config/<component>/config.json`` into ``out_dir``."""
    components = build_components(seed)
    sd = {name: module.state_dict() for name, module in components.items()}
    tensors = sgm_state_dict(sd["unet"], sd["text_encoder"], sd["text_encoder_2"], sd["vae"])
    tensors = {k: v.to(STORE_DTYPE) if v.is_floating_point() else v for k, v in tensors.items()}
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    # One metadata entry only: safetensors writes several in hash-map order, which varies per run.
    save_atomic(tensors, path, metadata={"qrlora.tiny": f"sdxl seed={seed}"})

    config_dir = os.path.join(out_dir, "config")
    for name in COMPONENTS:
        folder = os.path.join(config_dir, name)
        os.makedirs(folder, exist_ok=True)
        module = components[name]
        if name.startswith("text_encoder"):
            module.config.save_pretrained(folder)  # config.json only
        else:
            module.save_config(folder)
    return TinyModel(arch="sdxl", checkpoint=path, config_dir=config_dir)
