"""The lab base model: an SDXL-architecture UNet, the tiny SDXL's two text encoders (frozen,
rebuilt to pass each word's vector through and to summarise the caption in the pooled
embedding), and a built VAE, written as an SGM single file like any SDXL checkpoint.

The VAE is constructed, not trained: its latent is the mean colour of each 2x2 pixel block
(channels 0-2, RGB in [-1, 1]; channel 3 is 0), with a log-variance at diffusers' floor
(sampling adds noise of std 3e-7), and its decoder paints each latent back as a 2x2 block.
The world's patterns have a period of 4 pixels aligned to those blocks, so only shape edges
are blurred. One 2x down-sampling makes the UNet's work 5x cheaper than in pixel space
(docs/lab.md has the figures). Every residual branch is zeroed (identity blocks); the
down-sampler averages, the up-sampler copies; and the GroupNorm -> SiLU -> conv tail of each
half is made affine: the normalised group holds (x, K, -x, -K) for a constant K = 1000, so
its mean is exactly 0 and its standard deviation K/2 to within 1e-6 for any image; the norm's
scale restores x and a bias of 20 keeps SiLU on its linear part (SiLU(x + 20) = x + 20 to
within 1e-7), which the conv removes. Every weight is exact in fp16.
"""

from __future__ import annotations

import os

import torch

from qrlora.checkpoint import save_atomic
from qrlora.tiny import sdxl as tiny

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
_K, _SHIFT = 1000.0, 20.0

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 2,  # latents: the VAE halves the image size
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL's: no attention at full resolution
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=1,
    attention_head_dim=(4, 8),  # diffusers' name for the head count; head width 8
    norm_num_groups=8,
    cross_attention_dim=tiny.TE1_HIDDEN + tiny.TE2_HIDDEN,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=tiny.TIME_DIM,
    projection_class_embeddings_input_dim=6 * tiny.TIME_DIM + tiny.TE2_HIDDEN,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,  # one 2x down-sampling, like one of SDXL's three
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 8),  # (r, g, b, K, -r, -g, -b, -K)
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=1,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # latents are pixels in [-1, 1]
    force_upcast=True,
)


def _signed_channels(conv: torch.nn.Conv2d, sources: int) -> None:
    """conv -> 8 channels (s_0..s_2, K, -s_0..-s_2, -K) of its first ``sources`` inputs, centre tap."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = tuple(k // 2 for k in conv.kernel_size)
    for c in range(3):
        conv.weight[c, c][centre] = 1.0 if c < sources else 0.0
        conv.weight[4 + c, c][centre] = -1.0 if c < sources else 0.0
    conv.bias[3], conv.bias[7] = _K, -_K


def _affine_tail(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, outputs: list[tuple[int, int]]) -> None:
    """GroupNorm -> SiLU -> conv made to copy channel i of the signed 8 to output o, for (o, i)."""
    norm.weight.fill_(_K / 2)  # the group's std is K/2 (2 of its 8 channels are +-K): undo it
    norm.bias.fill_(_SHIFT)  # SiLU is the identity plus 20 far from 0
    conv.weight.zero_()
    conv.bias.zero_()
    centre = tuple(k // 2 for k in conv.kernel_size)
    for o, i in outputs:
        conv.weight[o, i][centre] = 1.0
        conv.bias[o] = -_SHIFT


def unet_config(attention: str = "low", factor: int = 2) -> dict:
    """The UNet's config: cross-attention at the ``"low"`` level only (SDXL's layout) or at
    ``"both"`` levels; latents ``factor`` times smaller than the image (1: pixel space)."""
    if attention not in ("low", "both"):
        raise ValueError(f"attention must be 'low' or 'both', not {attention!r}")
    config = dict(UNET_CONFIG, sample_size=IMAGE_SIZE // factor)
    if attention == "both":
        config.update(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    return config


def vae_config(factor: int = 2) -> dict:
    """The built VAE's config: one 2x down-sampling (``factor`` 2) or none (1, pixel space)."""
    if factor not in (1, 2):
        raise ValueError(f"the lab VAE's factor must be 1 or 2, not {factor!r}")
    if factor == 2:
        return dict(VAE_CONFIG)
    return dict(VAE_CONFIG, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                block_out_channels=(8,))


def block_vae(factor: int = 2):
    """The 2x2-block ``AutoencoderKL`` described above (``factor`` 1: the same, without the
    down- and up-sampler, so latents are the pixels)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        vae = AutoencoderKL(**vae_config(factor)).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            # Zero every residual branch (resnet conv2, attention output) and what feeds nothing.
            if ".conv2." in name or ".to_out." in name or ".to_q." in name or ".to_k." in name or ".to_v." in name:
                p.zero_()
        enc, dec = vae.encoder, vae.decoder
        _signed_channels(enc.conv_in, 3)
        # mean = pixels (channel 3 = 0); log-variance = -30 (diffusers clamps there)
        _affine_tail(enc.conv_norm_out, enc.conv_out, [(c, c) for c in range(3)])
        enc.conv_out.bias[LATENT_CHANNELS:] = -30.0
        if factor == 2:
            # encoder down-sampler (pad right/bottom, 3x3 stride 2): the mean of each 2x2 block
            down = enc.down_blocks[0].downsamplers[0].conv
            down.weight.zero_()
            down.bias.zero_()
            for c in range(down.out_channels):
                down.weight[c, c, :2, :2] = 0.25
            # decoder up-sampler (nearest 2x, then 3x3): the centre tap, so each latent covers 2x2 pixels
            up = dec.up_blocks[0].upsamplers[0].conv
            up.weight.zero_()
            up.bias.zero_()
            for c in range(up.out_channels):
                up.weight[c, c, 1, 1] = 1.0
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.zero_()
        for c in range(2 * LATENT_CHANNELS):
            vae.quant_conv.weight[c, c, 0, 0] = 1.0
        vae.post_quant_conv.weight.zero_()
        vae.post_quant_conv.bias.zero_()
        for c in range(LATENT_CHANNELS):
            vae.post_quant_conv.weight[c, c, 0, 0] = 1.0
        _signed_channels(dec.conv_in, 3)
        _affine_tail(dec.conv_norm_out, dec.conv_out, [(c, c) for c in range(3)])
    return vae


def fresh_unet(seed: int, attention: str = "low", factor: int = 2):
    """A randomly initialised (diffusers' own initialisers) lab UNet; same seed, same weights."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config(attention, factor))


# Word-vector text encoders (``word_vector_encoders``): how much of each transformer layer's
# residual branch is kept, and the token and position embeddings' standard deviations.
RESIDUAL_SCALE = 1e-3
TOKEN_STD, POSITION_STD = 1.0, 0.01


def word_vector_encoders(components: dict[str, torch.nn.Module]) -> None:
    """Make both text encoders (in place) pass each token's own vector through: every residual
    branch's output projection (``self_attn.out_proj``, ``mlp.fc2``) scaled to RESIDUAL_SCALE of
    its random value, large random token embeddings and small position embeddings, so the
    hidden state at a position is its word's vector plus a little. Why: random CLIPs with full
    residual branches mix every word into every later token through causal attention, and the
    UNet then has to untangle one word (the shape) from captions whose conditionings are 0.93
    alike; with one vector per word it reads the word directly, and the padding positions are
    all nearly the same vector, which cross-attention learns to ignore. The scaled matrices stay
    full-rank (not zero), so a basis or an adapter on them is well defined. Every value is
    rounded to fp16, as the file stores it, so training sees the file's encoders."""
    hidden = {"text_encoder": tiny.TE1_HIDDEN, "text_encoder_2": tiny.TE2_HIDDEN}
    with torch.no_grad():
        for name, width in hidden.items():
            for pname, p in components[name].named_parameters():
                if pname.endswith("token_embedding.weight"):
                    p.mul_(TOKEN_STD * width**0.5)  # drawn with std 1/sqrt(width)
                elif pname.endswith("position_embedding.weight"):
                    p.mul_(POSITION_STD * width**0.5)
                elif ".self_attn.out_proj." in pname or ".mlp.fc2." in pname:
                    p.mul_(RESIDUAL_SCALE)
                else:
                    continue
                p.copy_(p.to(tiny.STORE_DTYPE).float())


# The pooled caption summary (``pooled_caption_summary``): the gain of TE2's last attention
# branch over its residual, and what is left of the matrices that must not matter.
SUMMARY_GAIN, SUMMARY_RESIDUE = 20.0, 1e-3


def pooled_caption_summary(components: dict[str, torch.nn.Module]) -> None:
    """Make TE2's last layer (in place) write the mean of every token up to the end-of-text
    token into that token, so SDXL's pooled text embedding (``text_embeds``, read at that
    token after the last layer) summarises the whole caption. The UNet adds it to its timestep
    embedding, which reaches every residual block. Cross-attention still reads the penultimate
    layer's word vectors, which this layer does not touch. Measured: the base reaches its shape
    goal with or without it (docs/lab.md, runs 5 and 5b); the committed base has it. Construction: queries and keys scaled to SUMMARY_RESIDUE (uniform causal
    attention), values the identity, output projection SUMMARY_GAIN times the identity (both
    plus SUMMARY_RESIDUE of their random values, so every matrix stays full-rank)."""
    layer = components["text_encoder_2"].text_model.encoder.layers[-1]
    attn = layer.self_attn
    with torch.no_grad():
        for lin, gain in ((attn.q_proj, 0.0), (attn.k_proj, 0.0), (attn.v_proj, 1.0), (attn.out_proj, SUMMARY_GAIN)):
            eye = torch.eye(lin.weight.shape[0], lin.weight.shape[1])
            lin.weight.copy_((gain * eye + SUMMARY_RESIDUE * lin.weight).to(tiny.STORE_DTYPE).float())
            lin.bias.zero_()


def build(seed: int, attention: str = "low", factor: int = 2, pooled_summary: bool = True) -> dict[str, torch.nn.Module]:
    """All four components: fresh UNet, the tiny SDXL's text encoders for ``seed`` made
    word-vector encoders (``word_vector_encoders``) with a pooled caption summary
    (``pooled_caption_summary``, unless ``pooled_summary`` is False), built VAE."""
    components = tiny.build_components(seed)
    word_vector_encoders(components)
    if pooled_summary:
        pooled_caption_summary(components)
    components["unet"] = fresh_unet(seed, attention, factor)
    components["vae"] = block_vae(factor)
    return components


def write(components: dict[str, torch.nn.Module], path: str, config_dir: str, metadata: dict[str, str],
          scheduler: dict | None = None) -> None:
    """The SGM single file (fp16, like released SDXL files) and the diffusers configs beside it,
    with the noise schedule it was trained on in ``scheduler/scheduler_config.json`` (its
    ``prediction_type`` above all), where diffusers keeps it in a model folder."""
    sd = {name: module.state_dict() for name, module in components.items()}
    tensors = tiny.sgm_state_dict(sd["unet"], sd["text_encoder"], sd["text_encoder_2"], sd["vae"])
    tensors = {k: v.detach().to(tiny.STORE_DTYPE).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}
    save_atomic(tensors, path, metadata=metadata)
    for name in tiny.COMPONENTS:
        folder = os.path.join(config_dir, name)
        os.makedirs(folder, exist_ok=True)
        module = components[name]
        if name.startswith("text_encoder"):
            module.config.save_pretrained(folder)
        else:
            module.save_config(folder)
    if scheduler is not None:
        folder = os.path.join(config_dir, "scheduler")
        os.makedirs(folder, exist_ok=True)
        _write_json(os.path.join(folder, "scheduler_config.json"),
                    {"_class_name": "DDPMScheduler", **{k: v for k, v in scheduler.items() if not k.startswith("_")}})
        # diffusers' single-file loader reads a pipeline's components from this index (the
        # tokenizers are CLIP's, passed in by the caller: nothing here is downloaded)
        _write_json(os.path.join(config_dir, "model_index.json"), {
            "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]})


def _write_json(path: str, value: dict) -> None:
    import json

    from qrlora.checkpoint import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8"))
