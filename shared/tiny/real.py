"""Key → shape maps of the *real* full-size checkpoints, built without any weights.

The released configs are instantiated on PyTorch's ``meta`` device (no memory, no download)
and converted with our own layout maps, so counts, parameter totals, file sizes and
benchmarks can use the true shapes of SDXL base 1.0 and FLUX.1-dev.
"""

from __future__ import annotations

import torch

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json and the two text encoders
SDXL_BASE_UNET = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048, layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")

# black-forest-labs/FLUX.1-dev: transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def real_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The original-layout state dict of the real model, as meta tensors (shapes only)."""
    if arch == "sdxl":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from .sdxl import sgm_state_dict

        with torch.device("meta"):
            unet = UNet2DConditionModel(**SDXL_BASE_UNET)
            te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
        return sgm_state_dict(unet.state_dict(), te1.state_dict(), te2.state_dict())
    if arch == "flux":
        from diffusers import FluxTransformer2DModel

        from ..archs.flux import diffusers_to_bfl

        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        return diffusers_to_bfl(transformer.state_dict())
    raise ValueError(f"no real layout for {arch!r}")


def real_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in real_state_dict(arch).items()}
