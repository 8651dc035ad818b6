"""A tiny FLUX.1-dev: random weights, real layouts, a few megabytes.

Writes the four files a FLUX user has on disk, in the layouts the WebUIs and kohya read:

- ``flux1-tiny.safetensors``: the transformer in the BFL layout (fused qkv/linear1, the
  final layer's shift/scale order), converted from diffusers by ``archs.flux.diffusers_to_bfl``;
- ``ae.safetensors``: the VAE in the LDM layout, no prefix, no quant convs (as BFL ships it);
- ``clip_l.safetensors``: HF ``CLIPTextModel`` keys under ``text_model.``, fp16;
- ``t5xxl.safetensors``: HF ``T5EncoderModel`` keys, fp16, ``shared.weight`` only (the tied
  ``encoder.embed_tokens.weight`` is left out, as in the released t5xxl files);

plus ``config/<component>/config.json`` for the diffusers/transformers classes.

The architecture keeps FLUX's shape relations (16 latent channels packed 2x2 into 64 input
channels, guidance embedding, a VAE that downsamples 8x, full CLIP and T5 vocabularies so
real tokenizers fit) with tiny widths. The text encoders are written in fp16 like the
released files; their weights are rounded to fp16 values when built, so the files hold
exactly what ``build_components`` returns.
"""

from __future__ import annotations

import os

import torch

from ..archs.flux import diffusers_to_bfl
from . import TinyModel
from .vae import vae_diffusers_to_ldm

CHECKPOINT = "flux1-tiny.safetensors"
VAE_FILE = "ae.safetensors"
CLIP_FILE = "clip_l.safetensors"
T5_FILE = "t5xxl.safetensors"

CLIP_HIDDEN = 32  # also the pooled projection FLUX reads (CLIP-L's pooled output, 768 in the real model)
T5_HIDDEN = 32  # also the transformer's joint_attention_dim (4096 in the real model)

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 packing, as in FLUX.1
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_HIDDEN,
    pooled_projection_dim=CLIP_HIDDEN,
    guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
    axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: 8x downsampling, like the real AE
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_CONFIG = dict(
    vocab_size=49408,
    hidden_size=CLIP_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=CLIP_HIDDEN,
    bos_token_id=49406,
    eos_token_id=49407,  # the real id, so pooling picks the EOS token rather than argmax
    pad_token_id=49407,
)
T5_CONFIG = dict(
    vocab_size=32128,
    d_model=T5_HIDDEN,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX uses
    is_encoder_decoder=False,
    tie_word_embeddings=False,
    use_cache=False,
)


def build_components(seed: int) -> dict:
    """Freshly built, seeded modules: transformer, vae, text_encoder (CLIP-L), text_encoder_2 (T5).

    Each component is seeded on its own (seed, component index), so adding a component or
    building them in another order changes nothing. The caller's RNG state is left as it was.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    builders = (
        ("transformer", lambda: FluxTransformer2DModel(**TRANSFORMER_CONFIG), False),
        ("vae", lambda: AutoencoderKL(**VAE_CONFIG), False),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)), True),
        ("text_encoder_2", lambda: T5EncoderModel(T5Config(**T5_CONFIG)), True),
    )
    components = {}
    with torch.random.fork_rng(devices=[]):
        for index, (name, build, fp16_file) in enumerate(builders):
            torch.manual_seed(seed * 1000 + index)
            module = build().eval()
            _jitter(module, fp16_values=fp16_file)
            components[name] = module
    return components


@torch.no_grad()
def _jitter(module: torch.nn.Module, fp16_values: bool) -> None:
    # Default inits leave norm weights at 1 and many biases at 0. Identical tensors would let a
    # swapped key (norm_q <-> norm_k, say) pass the round-trip tests, so everything gets a
    # little noise; small enough to keep the model well-behaved.
    for param in module.parameters():
        param.add_(torch.randn_like(param) * 0.02)
        if fp16_values:
            param.copy_(param.half().float())


def make(out_dir: str, seed: int = 0) -> TinyModel:
    """Write the tiny FLUX.1-dev files into ``out_dir``; same seed, same bytes."""
    from safetensors.torch import save_file

    components = build_components(seed)
    meta = {"format": "pt"}

    transformer = diffusers_to_bfl(components["transformer"].state_dict())
    save_file(_contiguous(transformer), os.path.join(out_dir, CHECKPOINT), metadata=meta)

    vae = vae_diffusers_to_ldm(components["vae"].state_dict())
    save_file(_contiguous(vae), os.path.join(out_dir, VAE_FILE), metadata=meta)

    clip = components["text_encoder"].state_dict()
    # transformers 5 dropped the ``text_model.`` level from CLIPTextModel; the released files
    # (and transformers 4) keep it, so the file always has it.
    clip = {(k if k.startswith("text_model.") else "text_model." + k): v.half() for k, v in clip.items()}
    save_file(_contiguous(clip), os.path.join(out_dir, CLIP_FILE), metadata=meta)

    t5 = components["text_encoder_2"].state_dict()
    t5 = {k: v.half() for k, v in t5.items() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    save_file(_contiguous(t5), os.path.join(out_dir, T5_FILE), metadata=meta)

    config_dir = os.path.join(out_dir, "config")
    for name, module in components.items():
        target = os.path.join(config_dir, name)
        os.makedirs(target, exist_ok=True)
        if name in ("transformer", "vae"):
            module.save_config(target)
        else:
            module.config.save_pretrained(target)

    return TinyModel(
        arch="flux",
        checkpoint=os.path.join(out_dir, CHECKPOINT),
        config_dir=config_dir,
        extra_files={
            "vae": os.path.join(out_dir, VAE_FILE),
            "clip_l": os.path.join(out_dir, CLIP_FILE),
            "t5": os.path.join(out_dir, T5_FILE),
        },
    )


def _contiguous(state_dict: dict) -> dict:
    # safetensors wants contiguous tensors that share no storage; views from the renames
    # (chunks, reshapes) are copied.
    return {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
