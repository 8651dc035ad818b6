"""Module trees with the hosts' real names, built from an SGM-layout SDXL checkpoint.

``tree(state)`` turns parameter keys into a torch module tree whose ``named_modules()`` /
``named_parameters()`` follow the keys: 2-D ``weight`` → ``nn.Linear`` (``nn.Embedding`` for
token/position embeddings), 4-D → ``nn.Conv2d``, 1-D weight → ``nn.LayerNorm``, OpenCLIP's
``attn.in_proj_weight`` + ``attn.out_proj`` → ``nn.MultiheadAttention``; anything else a
parameter on its parent. Weights are the checkpoint's (as float32 unless a dtype is given).

- A1111 (sgm ``DiffusionEngine`` as the WebUI holds it after ``sd_hijack``): ``sd_model.model``
  holds ``diffusion_model`` (``model.diffusion_model.*`` keys), ``sd_model.conditioner.embedders[i]``
  are wrappers whose ``.wrapped`` holds the ``conditioner.embedders.{i}.*`` keys.
- Forge (``backend/diffusion_engine/sdxl.py``): the ``UnetPatcher``'s model is a ``KModel`` with
  ``diffusion_model`` (same UNet keys) and ``storage_dtype``; the ``CLIP`` holds Hugging Face text
  models ``clip_l`` (the checkpoint's TE1 keys) and ``clip_g`` (TE2 converted to HF layout:
  q/k/v split out of ``in_proj_weight``, ``mlp.fc1/fc2``).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from qrlora import archs
from qrlora.checkpoint import SafetensorsFile

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0."
TE2 = "conditioner.embedders.1."


def read(path: str, prefixes=(UNET, TE1, TE2)) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {k: f.tensor(k) for k in f.keys if k.startswith(prefixes)}


def _child(root: nn.Module, path: list[str]) -> nn.Module:
    m = root
    for name in path:
        if not hasattr(m, name) or not isinstance(getattr(m, name), nn.Module):
            m.add_module(name, nn.Module())
        m = getattr(m, name)
    return m


def tree(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> nn.Module:
    root = nn.Module()
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        path, _, leaf = key.rpartition(".")
        modules.setdefault(path, {})[leaf] = t
    done = set()
    for path, params in sorted(modules.items()):
        if path in done:
            continue
        parts = path.split(".") if path else []
        if "in_proj_weight" in params:  # nn.MultiheadAttention (OpenCLIP)
            w = params["in_proj_weight"]
            out = modules[path + ".out_proj"]
            mha = nn.MultiheadAttention(w.shape[1], 1, bias="in_proj_bias" in params, dtype=dtype)
            with torch.no_grad():
                mha.in_proj_weight.copy_(w)
                if "in_proj_bias" in params:
                    mha.in_proj_bias.copy_(params["in_proj_bias"])
                mha.out_proj.weight.copy_(out["weight"])
                if "bias" in out:
                    mha.out_proj.bias.copy_(out["bias"])
            _child(root, parts[:-1]).add_module(parts[-1], mha)
            done.add(path + ".out_proj")
            continue
        w = params.get("weight")
        if w is None or set(params) - {"weight", "bias"}:
            parent = _child(root, parts)
            for leaf, t in params.items():
                if t.is_floating_point():
                    parent.register_parameter(leaf, nn.Parameter(t.to(dtype), requires_grad=False))
                else:
                    parent.register_buffer(leaf, t.clone())
            continue
        bias = "bias" in params
        if w.dim() == 2 and parts[-1].endswith("embedding"):
            m = nn.Embedding(w.shape[0], w.shape[1], dtype=dtype)
        elif w.dim() == 2:
            m = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=dtype)
        elif w.dim() == 4:
            m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=w.shape[2] // 2, bias=bias, dtype=dtype)
        elif w.dim() == 1:
            m = nn.LayerNorm(w.shape[0], elementwise_affine=True, bias=bias, dtype=dtype)
        else:
            raise ValueError(f"no module for {path} {tuple(w.shape)}")
        with torch.no_grad():
            m.weight.copy_(w)
            if bias:
                m.bias.copy_(params["bias"])
        m.requires_grad_(False)
        _child(root, parts[:-1]).add_module(parts[-1], m)
    return root


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class _Wrapper(nn.Module):
    """An ``sd_hijack``-wrapped embedder: the original is ``.wrapped``."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped


def a1111_sdxl(checkpoint: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    state = read(checkpoint)
    sd = nn.Module()
    sd.model = tree(_strip(state, "model."), dtype)  # .diffusion_model
    sd.conditioner = nn.Module()
    sd.conditioner.embedders = nn.ModuleList([_Wrapper(tree(_strip(state, TE1), dtype)),
                                              _Wrapper(tree(_strip(state, TE2), dtype))])
    sd.is_sdxl = True
    sd.sd_checkpoint_info = types.SimpleNamespace(filename=checkpoint)
    sd.filename = checkpoint
    return sd


def te2_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TE2's linears in Hugging Face layout (``transformer.text_model.encoder.layers.N.…``), as
    Forge holds ``clip_g``."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    out = {}
    for t in archs.get("sdxl").linear_targets(shapes):
        if t.name.startswith("te2."):
            w = state[t.key]
            out["transformer." + t.name[4:] + ".weight"] = w[t.rows[0]:t.rows[1]] if t.rows else w
    return out


def forge_sdxl(checkpoint: str, dtype: torch.dtype = torch.float32):
    from backend.diffusion_engine import ForgeObjects
    from backend.patcher.clip import CLIP
    from backend.patcher.unet import UnetPatcher

    state = read(checkpoint)
    kmodel = tree(_strip(state, "model."), dtype)  # KModel: .diffusion_model
    kmodel.storage_dtype = dtype
    unet = UnetPatcher(kmodel)
    clip = CLIP({"clip_l": tree(_strip(state, TE1), dtype), "clip_g": tree(te2_hf_state(state), dtype)})
    sd = types.SimpleNamespace()
    sd.forge_objects = ForgeObjects(unet, clip)
    sd.forge_objects_original = sd.forge_objects.shallow_copy()
    sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()
    sd.current_lora_hash = str([])
    sd.is_sdxl = True
    sd.model_config = types.SimpleNamespace(huggingface_repo="stabilityai/stable-diffusion-xl-base-1.0")
    sd.sd_checkpoint_info = types.SimpleNamespace(filename=checkpoint)
    sd.filename = checkpoint
    return sd


STORAGES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "nf4", "fp4",
            "gguf:Q8_0", "gguf:Q4_0", "gguf:Q4_K", "gguf:BF16")


def forge_flux(checkpoint: str, dtype: torch.dtype = torch.float32, storage: str | None = None):
    """Forge's FLUX (``backend/diffusion_engine/flux.py``): the transformer is the KModel's
    ``diffusion_model`` with BFL parameter names (``diffusion_model.double_blocks.0.img_attn.qkv.weight``:
    q, k, v fused by rows), its linears stored as ``storage`` says (``backend/loader.py``: the
    "Diffusion in Low Bits" choice or the file's own format):

    - a torch dtype name (``bfloat16``, ``float8_e4m3fn``, ``float8_e5m2``...): ``ForgeOperations``
      linears holding the weight in that dtype (``storage_dtype`` is the dtype);
    - ``nf4`` / ``fp4``: ``ForgeOperationsBNB4bits`` linears (``ForgeLoader4Bit`` with a
      ``ForgeParams4bit`` weight), ``storage_dtype`` the string;
    - ``gguf:<type>``: ``ForgeOperationsGGUF`` linears whose 2-D weights are ``ParameterGGUF`` of
      that type, ``storage_dtype`` ``"gguf"`` (1-D norms stay float, as in GGUF FLUX files).
    """
    from backend.diffusion_engine import ForgeObjects
    from backend.operations_bnb import ForgeLoader4Bit
    from backend.operations_gguf import ParameterGGUF
    from backend.patcher.clip import CLIP
    from backend.patcher.unet import UnetPatcher

    f = SafetensorsFile(checkpoint)
    kmodel = nn.Module()
    storage = storage or str(dtype).replace("torch.", "")
    plain = getattr(torch, storage, None) if ":" not in storage and storage not in ("nf4", "fp4") else None
    kmodel.add_module("diffusion_model", tree({k: f.tensor(k) for k in f.keys},
                                              torch.bfloat16 if plain is None else
                                              plain if plain in (torch.float32, torch.float16, torch.bfloat16)
                                              else torch.float32))
    for name, m in list(kmodel.named_modules()):
        if not isinstance(m, nn.Linear):
            continue
        if storage in ("nf4", "fp4"):
            parent, _, child = name.rpartition(".")
            kmodel.get_submodule(parent).add_module(child, ForgeLoader4Bit(m.weight, m.bias, storage))
        elif storage.startswith("gguf:"):
            m.weight = ParameterGGUF.quantized(m.weight, storage[5:])
        elif plain not in (torch.float32, torch.float16, torch.bfloat16):
            m.weight = nn.Parameter(m.weight.detach().to(plain), requires_grad=False)
    kmodel.storage_dtype = plain if plain is not None else "gguf" if storage.startswith("gguf:") else storage
    sd = types.SimpleNamespace()
    sd.forge_objects = ForgeObjects(UnetPatcher(kmodel), CLIP({}))
    sd.forge_objects_original = sd.forge_objects.shallow_copy()
    sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()
    sd.current_lora_hash = str([])
    sd.is_sdxl = False
    sd.model_config = types.SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev")
    sd.sd_checkpoint_info = types.SimpleNamespace(filename=checkpoint)
    sd.filename = checkpoint
    return sd
