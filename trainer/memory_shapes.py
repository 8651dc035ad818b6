"""The shapes of the model a run trains: how ``trainer.memory`` builds each component on fake
tensors, from a built-in name, a diffusers folder or a single file (sized as the loaders size it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from torch import nn

MODELS = ("sdxl-base", "flux1-dev", "flux1-schnell", "tiny-sdxl", "tiny-flux")

# google/t5-v1_1-xxl's encoder sizes (FLUX's text_encoder_2; the loader reads them off a file's shapes)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


class NoShapes(ValueError):
    """The model's shapes cannot be known without loading it (a layout this module does not read)."""


@dataclass
class ModelShapes:
    """How to build each component of a model (on fake tensors), and its facts."""

    family: str  # "sdxl" or "flux"
    name: str
    denoiser: Callable[[], nn.Module]
    vae: Callable[[], nn.Module]
    text_encoders: list[Callable[[], nn.Module]]
    text_tokens: list[int]  # tokens per text encoder (CLIP 77, T5 512/256)
    vae_factor: int  # pixels per latent along each side


def shapes_for(model: str, t5_tokens: int | None = None, config_dir: str | None = None) -> ModelShapes:
    """The component builders of ``model``: a name in MODELS, ``builtin:tiny-*``, a diffusers
    folder (its configs), or a single file (SDXL: the released architecture; FLUX: FLUX.1
    with the file's block counts and guidance embedding)."""
    from qrlora.tiny import real

    name = model[len("builtin:"):] if model.startswith("builtin:") else model
    if name == "tiny-sdxl":
        from qrlora.tiny import sdxl as tiny

        return sdxl_shapes(name, tiny.UNET_CONFIG, tiny.VAE_CONFIG, tiny.TE1_CONFIG, tiny.TE2_CONFIG)
    if name == "tiny-flux":
        from qrlora.tiny import flux as tiny

        return flux_shapes(name, tiny.TRANSFORMER_CONFIG, tiny.VAE_CONFIG, tiny.CLIP_CONFIG, tiny.T5_CONFIG, t5_tokens)
    if name == "sdxl-base":
        from trainer.families.sdxl_load import SDXL_BASE_VAE

        return sdxl_shapes(name, real.SDXL_BASE_UNET, SDXL_BASE_VAE, real.CLIP_L, real.CLIP_BIGG)
    if name in ("flux1-dev", "flux1-schnell"):
        from trainer.families.flux_load import FLUX_AE

        config = dict(real.FLUX_DEV_TRANSFORMER, guidance_embeds=name == "flux1-dev")
        return flux_shapes(name, config, FLUX_AE, real.CLIP_L, T5_XXL, t5_tokens)
    if os.path.isdir(model):
        return _from_folder(model, t5_tokens)
    if os.path.isfile(model):
        return _from_file(model, t5_tokens, config_dir)
    raise NoShapes(f"no model shapes for {model!r}: expected one of {', '.join(MODELS)}, a folder or a file")


def sdxl_shapes(name, unet_cfg, vae_cfg, te1_cfg, te2_cfg) -> ModelShapes:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return ModelShapes(
        "sdxl", name, lambda: UNet2DConditionModel(**unet_cfg), lambda: AutoencoderKL(**vae_cfg),
        [lambda: CLIPTextModel(CLIPTextConfig(**te1_cfg)), lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))],
        [77, 77], _vae_factor(vae_cfg))


def flux_shapes(name, transformer_cfg, vae_cfg, clip_cfg, t5_cfg, t5_tokens) -> ModelShapes:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trainer.families.flux_load import T5_V1_1

    t5_cfg = {**T5_V1_1, **t5_cfg}
    # kohya's t5xxl_max_token_length defaults: 512 for dev (guidance-distilled), 256 for schnell
    tokens = t5_tokens or (512 if transformer_cfg.get("guidance_embeds", True) else 256)
    return ModelShapes(
        "flux", name, lambda: FluxTransformer2DModel(**transformer_cfg), lambda: AutoencoderKL(**vae_cfg),
        [lambda: CLIPTextModel(CLIPTextConfig(**clip_cfg)), lambda: T5EncoderModel(T5Config(**t5_cfg))], [77, tokens],
        _vae_factor(vae_cfg))


def _vae_factor(vae_cfg: dict) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def _from_folder(folder: str, t5_tokens) -> ModelShapes:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import AutoConfig

    def config(sub, cls=None):
        path = os.path.join(folder, sub)
        return dict(cls.load_config(path)) if cls else AutoConfig.from_pretrained(path).to_dict()

    def clean(d):  # diffusers' bookkeeping keys are not constructor arguments
        return {k: v for k, v in d.items() if not k.startswith("_")}

    vae = clean(config("vae", AutoencoderKL))
    if os.path.isdir(os.path.join(folder, "transformer")):
        return flux_shapes(os.path.basename(folder), clean(config("transformer", FluxTransformer2DModel)), vae,
                     config("text_encoder"), config("text_encoder_2"), t5_tokens)
    return sdxl_shapes(os.path.basename(folder), clean(config("unet", UNet2DConditionModel)), vae,
                 config("text_encoder"), config("text_encoder_2"))


def _from_file(path: str, t5_tokens, config_dir: str | None) -> ModelShapes:
    """Sized as the loaders size them: an SDXL file by ``model.config_dir`` when given, else as
    SDXL base (the SDXL loader refuses any other shapes without a config_dir); a FLUX
    transformer's config is read off its shapes by the FLUX loader (block counts, widths,
    guidance embedding), with the released AE, CLIP-L and T5-XXL beside it."""
    from qrlora import archs
    from qrlora.archs.flux import checkpoint_prefix
    from qrlora.checkpoint import SafetensorsFile
    from qrlora.tiny import real
    from trainer.families.flux_load import FLUX_AE, transformer_config

    shapes = SafetensorsFile(path).shapes()
    prefix = checkpoint_prefix(shapes)
    if prefix is None:
        if archs.get("sdxl").detect(shapes):
            from trainer.families.sdxl_load import configs_for_file

            c = configs_for_file(path, shapes, config_dir)
            if config_dir is None:
                return shapes_for("sdxl-base")
            def clean(d):  # diffusers' bookkeeping keys are not constructor arguments
                return {k: v for k, v in d.items() if not k.startswith("_")}

            return sdxl_shapes(os.path.basename(path), clean(c.unet), clean(c.vae), c.te1.to_dict(), c.te2.to_dict())
        raise NoShapes(f"{path}: neither an SDXL nor a FLUX checkpoint")
    bare = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    config = {k: v for k, v in transformer_config(bare, config_dir, path).items() if not k.startswith("_")}
    return flux_shapes(os.path.basename(path), config, FLUX_AE, real.CLIP_L, T5_XXL, t5_tokens)
