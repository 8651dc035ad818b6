"""Loading SDXL: SGM single files, diffusers folders, separate VAEs. Nothing is downloaded.

A single file is read lazily with safetensors and converted with the project's own key maps
(``qrlora.archs.sdxl``): the UNet by ``UNetLayout.to_diffusers``, CLIP-L by stripping its
prefix, OpenCLIP-bigG to HF CLIP by splitting ``in_proj`` into q/k/v and transposing
``text_projection``; the VAE with diffusers' ``convert_ldm_vae_checkpoint``. Modules are built
from configs (the file's ``config_dir``, or SDXL base's when the shapes are SDXL base's) with
empty weights and filled by ``load_state_dict(strict=True, assign=True)``, so a key a map
gets wrong is an error, never a silently random layer, and no weight is allocated twice.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qrlora.archs.sdxl import SDXL, TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, UNetLayout, te2_hf_to_openclip
from qrlora.checkpoint import SafetensorsFile

VAE_PREFIX = "first_stage_model."
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Keys real SDXL files carry that the modules do not: a buffer older transformers saved, and
# OpenCLIP's contrastive temperature.
IGNORED_KEYS = (TE1_PREFIX + "text_model.embeddings.position_ids", TE2_PREFIX + "logit_scale")

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (shared/tiny/real.py has the others)
SDXL_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscrete); the
# DDPM training scheduler and every sampler are built from it.
SDXL_BASE_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    skip_prk_steps=True, trained_betas=None,
)


@dataclass
class Configs:
    unet: dict
    vae: dict
    te1: Any  # transformers.CLIPTextConfig
    te2: Any
    source: str  # "config_dir <path>" or "SDXL base 1.0"


# ----------------------------------------------------------------- configs
def configs_from_dir(config_dir: str) -> Configs:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    missing = [c for c in COMPONENTS if not os.path.isfile(os.path.join(config_dir, c, "config.json"))]
    if missing:
        raise FileNotFoundError(f"model.config_dir {config_dir}: no config.json in {', '.join(c + '/' for c in missing)}")
    sub = functools.partial(os.path.join, config_dir)
    return Configs(
        unet=dict(UNet2DConditionModel.load_config(sub("unet"))),
        vae=dict(AutoencoderKL.load_config(sub("vae"))),
        te1=CLIPTextConfig.from_pretrained(sub("text_encoder"), local_files_only=True),
        te2=CLIPTextConfig.from_pretrained(sub("text_encoder_2"), local_files_only=True),
        source=f"config_dir {config_dir}",
    )


def real_configs() -> Configs:
    from transformers import CLIPTextConfig

    from qrlora.tiny.real import CLIP_BIGG, CLIP_L, SDXL_BASE_UNET

    return Configs(dict(SDXL_BASE_UNET), dict(SDXL_BASE_VAE), CLIPTextConfig(**CLIP_L), CLIPTextConfig(**CLIP_BIGG),
                   "SDXL base 1.0")


@functools.lru_cache(maxsize=1)
def real_sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a full SDXL base 1.0 SGM file (UNet, both encoders, VAE); from meta modules."""
    from diffusers import AutoencoderKL

    from qrlora.tiny.real import real_shapes
    from qrlora.tiny.vae import vae_diffusers_to_ldm

    shapes = dict(real_shapes("sdxl"))
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_BASE_VAE)
    shapes.update({VAE_PREFIX + k: tuple(v.shape) for k, v in vae_diffusers_to_ldm(vae.state_dict()).items()})
    return shapes


def real_sdxl_mismatch(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """None if the UNet/encoder/VAE keys have exactly SDXL base's shapes, else the first difference."""
    expected = real_sdxl_shapes()
    prefixes = (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX, VAE_PREFIX)
    has_vae = any(k.startswith(VAE_PREFIX) for k in shapes)
    for key, shape in sorted(expected.items()):
        if key in IGNORED_KEYS or (key.startswith(VAE_PREFIX) and not has_vae):
            continue
        if key not in shapes:
            return f"no {key}"
        if tuple(shapes[key]) != shape:
            return f"{key} is {tuple(shapes[key])}, SDXL base has {shape}"
    extra = sorted(k for k in shapes if k.startswith(prefixes) and k not in expected and k not in IGNORED_KEYS)
    return f"{extra[0]} is not in SDXL base" if extra else None


def configs_for_file(path: str, shapes: dict, config_dir: str | None) -> Configs:
    if config_dir:
        return configs_from_dir(config_dir)
    problem = real_sdxl_mismatch(shapes)
    if problem is None:
        return real_configs()
    raise ValueError(
        f"{path}: an SGM-layout SDXL checkpoint, but not shaped like SDXL base 1.0 ({problem}). "
        "Set model.config_dir to a folder with unet/, vae/, text_encoder/ and text_encoder_2/ "
        "config.json files describing it (a diffusers copy of the model, configs only, is enough)."
    )


def scheduler_config(folder: str | None = None, prediction_type: str | None = None) -> dict:
    """SDXL base's scheduler settings, overridden by a diffusers folder's scheduler config."""
    cfg = dict(SDXL_BASE_SCHEDULER)
    path = os.path.join(folder, "scheduler", "scheduler_config.json") if folder else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cfg.update({k: v for k, v in json.load(f).items() if not k.startswith("_")})
    if prediction_type:
        cfg["prediction_type"] = prediction_type
    return cfg


# ----------------------------------------------------------------- building and filling modules
def empty_modules(configs: Configs) -> dict[str, torch.nn.Module]:
    """The four modules with parameters on the meta device (buffers real), ready for ``assign``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with _empty():
        return {
            "unet": UNet2DConditionModel.from_config(configs.unet),
            "vae": AutoencoderKL.from_config(configs.vae),
            "text_encoder": CLIPTextModel(configs.te1),
            "text_encoder_2": CLIPTextModelWithProjection(configs.te2),
        }


def _empty():
    """Parameters on the meta device, buffers real (accelerate); without accelerate, a plain
    (slower, randomly initialised) build gives the same result after ``fill``."""
    try:
        from accelerate import init_empty_weights

        return init_empty_weights()
    except ImportError:
        import contextlib

        return contextlib.nullcontext()


def fill(module: torch.nn.Module, state_dict: dict, what: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """Strictly load ``state_dict`` (cast to ``dtype`` on ``device``) into a module built empty."""
    sd = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in state_dict.items()}
    result = module.load_state_dict(sd, strict=False, assign=True)
    # Position ids are a persistent buffer in older transformers; the module made its own.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{what}: weights do not fit the model config: missing {_few(missing)}, "
            f"unexpected {_few(result.unexpected_keys)}"
        )
    for name, p in module.named_parameters():
        if p.is_meta:
            raise ValueError(f"{what}: parameter {name} was not loaded")
    module.to(device)  # buffers the file does not hold (position ids, ...)
    return module.requires_grad_(False).eval()


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def fit_text_model_prefix(state_dict: dict, module: torch.nn.Module) -> dict:
    """Checkpoints say ``text_model.encoder…``; transformers 5's CLIPTextModel says ``encoder…``."""
    if any(k.startswith("text_model.") for k in module.state_dict()):
        return state_dict
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state_dict.items()}


# ----------------------------------------------------------------- SGM single file
def unet_from_sgm(ckpt: SafetensorsFile) -> dict:
    keys = [k for k in ckpt.keys if k.startswith(UNET_PREFIX)]
    layout = UNetLayout.from_sgm_keys(keys)
    return {layout.to_diffusers(k[len(UNET_PREFIX):]): ckpt.tensor(k) for k in keys}


def te1_from_sgm(ckpt: SafetensorsFile, module: torch.nn.Module) -> dict:
    sd = {k[len(TE1_PREFIX):]: ckpt.tensor(k) for k in ckpt.keys if k.startswith(TE1_PREFIX) and k not in IGNORED_KEYS}
    return fit_text_model_prefix(sd, module)


def te2_from_sgm(ckpt: SafetensorsFile, module: torch.nn.Module) -> dict:
    """OpenCLIP text tower -> HF CLIPTextModelWithProjection, driven by the module's own keys so
    that every file tensor is accounted for (the inverse of shared/tiny/sdxl.py's writer)."""
    out, used, fused = {}, set(), {}
    for key, buf in module.state_dict().items():
        if key.endswith("position_ids"):  # a persistent buffer in older transformers: keep it
            out[key] = buf
            continue
        sub, block = te2_hf_to_openclip(key)
        full = TE2_PREFIX + sub
        if full not in ckpt.header:
            continue  # reported as missing by the strict load
        used.add(full)
        if block is None:
            tensor = ckpt.tensor(full)
            out[key] = tensor.T.contiguous() if sub == "text_projection" else tensor
        else:
            if full not in fused:
                fused[full] = ckpt.tensor(full)
            rows = fused[full].shape[0] // 3
            out[key] = fused[full][block * rows : (block + 1) * rows]
    extra = [k for k in ckpt.keys if k.startswith(TE2_PREFIX) and k not in used and k not in IGNORED_KEYS]
    if extra:
        raise ValueError(f"text encoder 2: checkpoint keys with no place in the model: {_few(extra)}")
    return out


def vae_from_ldm(tensors: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(tensors, config)


def load_sgm(path: str, configs: Configs, device, weight_dtype, vae_dtype, skip_vae: bool) -> dict[str, torch.nn.Module]:
    ckpt = SafetensorsFile(path)
    mods = empty_modules(configs)
    fill(mods["unet"], unet_from_sgm(ckpt), f"{path}: UNet", weight_dtype, device)
    fill(mods["text_encoder"], te1_from_sgm(ckpt, mods["text_encoder"]), f"{path}: text encoder 1", weight_dtype, device)
    fill(mods["text_encoder_2"], te2_from_sgm(ckpt, mods["text_encoder_2"]), f"{path}: text encoder 2", weight_dtype, device)
    if skip_vae:
        mods.pop("vae")
    else:
        vae_keys = [k for k in ckpt.keys if k.startswith(VAE_PREFIX)]
        if not vae_keys:
            raise ValueError(f"{path}: the checkpoint has no VAE ({VAE_PREFIX}*); set model.vae to a VAE file or folder")
        vae_sd = vae_from_ldm({k: ckpt.tensor(k) for k in vae_keys}, mods["vae"].config)
        fill(mods["vae"], vae_sd, f"{path}: VAE", vae_dtype, device)
    ckpt.close()
    return mods


def load_vae(path: str, config: dict, device, dtype):
    """``model.vae``: a diffusers VAE folder, or a file in diffusers or LDM layout (bare or
    ``first_stage_model.``-prefixed keys), shaped like ``config``."""
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device, dtype).requires_grad_(False).eval()
    ckpt = SafetensorsFile(path)
    tensors = {k: ckpt.tensor(k) for k in ckpt.keys}
    ckpt.close()
    if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in tensors):
        tensors = vae_from_ldm(tensors, config)
    with _empty():
        vae = AutoencoderKL.from_config(config)
    return fill(vae, tensors, f"model.vae {path}", dtype, device)




# ----------------------------------------------------------------- diffusers folder
def is_diffusers_sdxl(folder: str) -> bool:
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            if "StableDiffusionXL" in str(json.load(f).get("_class_name", "")):
                return True
    return all(os.path.isfile(os.path.join(folder, c, "config.json")) for c in ("unet", "text_encoder_2"))


def load_folder(folder: str, device, weight_dtype, vae_dtype, skip_vae: bool) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kinds = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
             "text_encoder_2": CLIPTextModelWithProjection}
    mods = {}
    for name, cls in kinds.items():
        if name == "vae" and skip_vae:
            continue
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"model.pretrained {folder}: no {name}/ folder (a diffusers SDXL model has all of {COMPONENTS})")
        module = cls.from_pretrained(sub, local_files_only=True)
        dtype = vae_dtype if name == "vae" else weight_dtype
        mods[name] = module.to(device, dtype).requires_grad_(False).eval()
    return mods


def component_weight_files(folder: str) -> list[str]:
    """The safetensors files ``from_pretrained`` reads for one component folder (sharded or not)."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = os.path.join(folder, f"{stem}.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                return sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
        single = os.path.join(folder, f"{stem}.safetensors")
        if os.path.isfile(single):
            return [single]
    return []


def folder_weight_reader(folder: str) -> Callable[[str], torch.Tensor | None]:
    """Layer name (``unet.…``, ``te1.text_model.…``, ``te2.text_model.…``) -> its stored weight
    read lazily from the folder's files, or None if they cannot be read (e.g. .bin weights)."""
    parts = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
    files: dict[str, dict[str, SafetensorsFile]] = {}

    def index(component: str) -> dict[str, SafetensorsFile]:
        if component not in files:
            files[component] = {}
            for path in component_weight_files(os.path.join(folder, component)):
                ckpt = SafetensorsFile(path)
                files[component].update({k: ckpt for k in ckpt.keys})
        return files[component]

    def read(name: str) -> torch.Tensor | None:
        part, _, module = name.partition(".")
        keys = index(parts[part])
        for key in (module + ".weight", module.removeprefix("text_model.") + ".weight"):
            if key in keys:
                return keys[key].tensor(key)
        return None

    return read


def sgm_targets_from_modules(unet, te1, te2) -> list:
    """``qrlora.archs.Target`` list for modules that came from a folder: their state dicts (as
    meta tensors, so nothing is copied) mapped to the SGM layout, then SDXL's own target rules."""
    from qrlora.tiny.sdxl import sgm_state_dict

    def meta(module):
        return {k: torch.empty(v.shape, device="meta") for k, v in module.state_dict().items()}

    sd = sgm_state_dict(meta(unet), meta(te1), meta(te2))
    return SDXL().linear_targets({k: tuple(v.shape) for k, v in sd.items()})
