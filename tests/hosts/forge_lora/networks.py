"""Stand-in of Forge extensions-builtin/sd_forge_lora/networks.py ``load_networks`` and
``load_lora_for_models``, with the key maps of ``packages_3rdparty/comfyui_lora_collection/lora.py``
(``model_lora_keys_unet``: ``lora_unet_<path_>`` → ``diffusion_model.<path>.weight``;
``model_lora_keys_clip``: ``lora_te1_text_model_encoder_layers_N_<c_>`` → ``clip_l.transformer.…``,
``lora_te2_…`` → ``clip_g.transformer.…``) and ``load_lora`` (``lora_up``/``lora_down``/``alpha`` →
``("lora", (up, down, alpha, None, None))``).

``load_networks``: online mode off for fp32/fp16/bf16 storage; returns early when
``str([[filename, unet, te, online], …])`` equals ``sd_model.current_lora_hash``; otherwise resets
``forge_objects.unet/clip`` to ``forge_objects_original``'s, patches clones per file, and sets
``forge_objects_after_applying_lora = forge_objects.shallow_copy()``.
"""

import os

import torch
from safetensors.torch import load_file

from backend.args import dynamic_args
from modules import shared

available_networks = {}  # name -> filename
loaded_networks = []


# Forge extensions-builtin/sd_forge_lora/networks.py: list_available_networks


def list_available_networks():
    available_networks.clear()
    folder = shared.cmd_opts.lora_dir
    if folder and os.path.isdir(folder):
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".safetensors"):
                available_networks[fn[: -len(".safetensors")]] = os.path.join(folder, fn)


# Forge packages_3rdparty/comfyui_lora_collection/lora.py: _keys_unet


def _keys_unet(model):
    out = {}
    for k, _ in model.named_parameters():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            out["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    return out


# Forge packages_3rdparty/comfyui_lora_collection/lora.py: _keys_clip


def _keys_clip(model):
    out = {}
    for k, _ in model.named_parameters():
        for prefix, lora in (("clip_l.transformer.text_model.", "lora_te1_text_model_"),
                             ("clip_g.transformer.text_model.", "lora_te2_text_model_")):
            if k.startswith(prefix) and k.endswith(".weight"):
                out[lora + k[len(prefix):-len(".weight")].replace(".", "_")] = k
    return out


# Forge packages_3rdparty/comfyui_lora_collection/lora.py: _load_lora


def _load_lora(lora, to_load):
    patch_dict, loaded = {}, set()
    for x, target in to_load.items():
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up in lora and down in lora:
            alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
            patch_dict[target] = ("lora", (lora[up], lora[down], alpha, None, None))
            loaded.update({up, down, f"{x}.alpha"})
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


# Forge extensions-builtin/sd_forge_lora/networks.py: load_lora_for_models


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename, online_mode=False):
    lora_unet, rest = _load_lora(lora, _keys_unet(model.model))
    lora_clip, rest = _load_lora(rest, _keys_clip(clip.cond_stage_model))
    if len(rest) > 12:
        return model, clip
    new_model, new_clip = model.clone(), clip.clone()
    if lora_unet:
        new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model, online_mode=online_mode)
        model = new_model
    if lora_clip:
        new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode)
        clip = new_clip
    return model, clip


# Forge extensions-builtin/sd_forge_lora/networks.py: load_networks


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = shared.sd_model
    loaded_networks.clear()
    if any(n not in available_networks for n in names):
        list_available_networks()
    filenames = [available_networks.get(n) for n in names]
    online_mode = dynamic_args.get("online_lora", False)
    if current_sd.forge_objects.unet.model.storage_dtype in [torch.float32, torch.float16, torch.bfloat16]:
        online_mode = False
    targets = [[f, u, t, online_mode] for f, u, t in zip(filenames, unet_multipliers or [], te_multipliers or []) if f]
    if current_sd.current_lora_hash == str(targets):
        return
    current_sd.current_lora_hash = str(targets)
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, online in targets:
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, load_file(filename),
            strength_model, strength_clip, filename=filename, online_mode=online)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
