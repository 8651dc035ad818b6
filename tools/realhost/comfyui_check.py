"""ComfyUI's own LoRA key map and weight merge on our kohya exports (tiny SDXL and tiny FLUX).

    python tools/realhost/comfyui_check.py /path/to/ComfyUI

Imports ``comfy/lora.py``, ``comfy/utils.py`` and ``comfy/weight_adapter/`` from the given
ComfyUI checkout, unchanged, and stubs only what importing them on a CPU-only machine without
ComfyUI's environment needs:

- ``comfy.model_management``: only ``cast_to_device`` (a plain ``tensor.to``); the real module
  probes GPUs and memory at import;
- ``comfy.model_base``: the model classes ``model_lora_keys_unet`` tests with ``isinstance``
  (empty classes; the FLUX stand-in model is an instance of its ``Flux``), because the real
  module imports every model ComfyUI knows;
- ``einops``, when not installed (``comfy/utils.py`` imports ``rearrange``; never called here).

For each family it makes the tiny checkpoint, a basis, a random ΔR file on every target
(SDXL: UNet and both text encoders; FLUX: every block linear, so the fused qkv and linear1
modules are exercised), exports it with ``qrlora export``'s code as a kohya LoRA, and then:
builds ComfyUI's key map from a stand-in model whose ``state_dict()`` has ComfyUI's names
(``diffusion_model.`` + the checkpoint's UNet/transformer keys; ``clip_l.transformer.`` /
``clip_g.transformer.`` + the HF text-model names ComfyUI converts SDXL's text encoders to),
loads the LoRA with ``comfy.lora.load_lora`` (every key must be consumed: it warns for each one
it does not load), merges each patch with ``comfy.lora.calculate_weight`` and compares the
weight change with the ΔW the core applies (s·Q·(ΔR⊙M) on the target's rows). Exit 0 when
every key matched and every ΔW agrees.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RANK = 4


def import_comfy(folder: str):
    """comfy.lora from the checkout, with the stubs listed in the module docstring."""
    management = types.ModuleType("comfy.model_management")
    management.cast_to_device = lambda tensor, device, dtype, copy=False: tensor.to(device=device, dtype=dtype, copy=copy)
    base = types.ModuleType("comfy.model_base")

    class Flux:  # the FLUX stand-in model's class
        pass

    base.Flux = Flux
    def model_class(name):  # any other model class lora.py names: an empty class of its own
        if not name[:1].isupper():
            raise AttributeError(name)
        return base.__dict__.setdefault(name, type(name, (), {}))

    base.__getattr__ = model_class
    sys.modules["comfy.model_management"] = management
    sys.modules["comfy.model_base"] = base
    try:
        import einops  # noqa: F401
    except ImportError:
        stub = types.ModuleType("einops")
        stub.rearrange = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("einops stub called"))
        sys.modules["einops"] = stub
    sys.path.insert(0, os.path.abspath(folder))
    import comfy
    import comfy.lora
    import comfy.utils  # noqa: F401

    comfy.model_management = management
    comfy.model_base = base
    return comfy.lora, base


class StandIn:
    """What ``model_lora_keys_unet`` / ``_clip`` read of a ComfyUI model: its state dict and
    ``model_config.unet_config``."""

    def __init__(self, tensors: dict, unet_config: dict):
        self.tensors = tensors
        self.model_config = types.SimpleNamespace(unet_config=unet_config)

    def state_dict(self):
        return self.tensors


def comfy_models(arch: str, checkpoint: str, d, model_base):
    """(unet/transformer stand-in, text-encoder stand-in or None) with ComfyUI's key names."""
    from qrlora.archs.flux import checkpoint_prefix
    from qrlora.checkpoint import SafetensorsFile

    f = SafetensorsFile(checkpoint)
    if arch == "flux":
        prefix = checkpoint_prefix(f.keys)
        sd = {"diffusion_model." + k[len(prefix):]: f.tensor(k).float() for k in f.keys if k.startswith(prefix)}
        config = {"depth": len({k.split(".")[1] for k in f.keys if k.startswith(prefix + "double_blocks.")}),
                  "depth_single_blocks": len({k.split(".")[1] for k in f.keys if k.startswith(prefix + "single_blocks.")}),
                  "hidden_size": f.shape(prefix + "img_in.weight")[0]}
        return type("FluxStandIn", (StandIn, model_base.Flux), {})(sd, config), None
    unet = {"diffusion_model." + k[len("model.diffusion_model."):]: f.tensor(k).float()
            for k in f.keys if k.startswith("model.diffusion_model.")}
    # ComfyUI holds SDXL's text encoders under HF names: CLIP-L as stored, OpenCLIP-G converted
    # (its fused in_proj split into q/k/v). The targets name exactly those HF modules.
    clip = {}
    for name in d.names:
        if name.startswith(("te1.", "te2.")):
            t = d.targets[name]
            w = f.tensor(t.key)
            w = w[t.rows[0]:t.rows[1]] if t.rows else w
            tower = "clip_l" if name.startswith("te1.") else "clip_g"
            clip[f"{tower}.transformer.{name[4:]}.weight"] = w.float()
    return StandIn(unet, {}), StandIn(clip, {})


def check(arch: str, work: str, lora_module, model_base) -> list[str]:
    from safetensors.torch import load_file

    from qrlora import archs, deltar
    from qrlora.basis import basis_from_checkpoint
    from qrlora.checkpoint import save_atomic
    from qrlora.export import to_kohya
    from qrlora.tiny import make_tiny

    tiny = make_tiny(arch, os.path.join(work, arch))
    targets = ["sdxl-all", "sdxl-te"] if arch == "sdxl" else "flux-all"
    b = basis_from_checkpoint(tiny.checkpoint, RANK, targets)
    g = torch.Generator().manual_seed(1)
    delta_r = {t.name: torch.randn(RANK, t.shape[1], generator=g) * 0.1 for t in b.targets}
    d = deltar.from_basis(b, delta_r, alpha=2.0, mask="triu")
    tensors, meta = to_kohya(d, b.q, torch.float32)
    path = os.path.join(work, f"{arch}-kohya.safetensors")
    save_atomic(tensors, path, meta)
    lora = load_file(path)

    model, clip = comfy_models(arch, tiny.checkpoint, d, model_base)
    key_map: dict = {}
    lora_module.model_lora_keys_unet(model, key_map)
    if clip is not None:
        lora_module.model_lora_keys_clip(clip, key_map)
    unloaded: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: unloaded.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        patches = lora_module.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    problems = [m for m in unloaded if "not loaded" in m]

    # the ΔW the core applies, placed on each target's rows of ComfyUI's weight
    a = archs.get(arch)
    expected: dict[str, torch.Tensor] = {}
    for name in d.names:
        t = d.targets[name]
        module, rows, _ = a.kohya_module(t)
        if name.startswith(("te1.", "te2.")):
            key = f"{'clip_l' if name.startswith('te1.') else 'clip_g'}.transformer.{name[4:]}.weight"
            rows = None
        else:
            key = key_map.get(module)
        if key is None:
            problems.append(f"{name}: ComfyUI has no key for kohya module {module}")
            continue
        weights = (clip.tensors if clip is not None and key in clip.tensors else model.state_dict())
        dw = expected.setdefault(key, torch.zeros_like(weights[key]))
        dw[slice(*rows) if rows else slice(None)] += d.delta_weight(name, b.q[name])
    worst = 0.0
    for key, patch in patches.items():
        weights = clip.tensors if clip is not None and key in clip.tensors else model.state_dict()
        w = weights[key].clone()
        merged = lora_module.calculate_weight([(1.0, patch, 1.0, None, None)], w.clone(), key)
        got = merged - w
        want = expected.get(key, torch.zeros_like(w))
        err = float((got - want).norm() / want.norm().clamp_min(1e-12))
        worst = max(worst, err)
        if err > 1e-5:
            problems.append(f"{key}: ComfyUI's ΔW differs from the core's by {err:.2e} (relative)")
    missing = sorted(set(expected) - set(patches))
    problems += [f"{k}: no ComfyUI patch" for k in missing]
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    print(f"{arch}: {len(lora)} LoRA keys in {len(modules)} kohya modules for {len(d.names)} layers; ComfyUI loaded "
          f"{len(patches)} patches, unloaded keys: {len(unloaded)}; worst relative ΔW difference {worst:.1e}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("comfyui", help="a ComfyUI checkout (the folder holding comfy/)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT))
    torch.set_num_threads(1)
    lora_module, model_base = import_comfy(args.comfyui)
    problems = []
    with tempfile.TemporaryDirectory() as work:
        for arch in ("sdxl", "flux"):
            problems += check(arch, work, lora_module, model_base)
    for line in problems:
        print("PROBLEM:", line)
    print("OK: every key matched and every ΔW equal" if not problems else f"{len(problems)} problems")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
