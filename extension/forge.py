"""Forge: the fused ΔR as standard ``"lora"`` weight patches on Forge's model patchers.

Verified against lllyasviel/stable-diffusion-webui-forge (``dfdcbab``):

- ``backend/patcher/base.py`` ``ModelPatcher.add_patches(*, filename, patches, strength_patch,
  strength_model, online_mode)``: keys are parameter names or ``(name, (dim, start, length))``;
  only keys naming a parameter are kept (returned as a set); the identity of the patch set is
  ``(filename, strength_patch, strength_model, online_mode)``. ``clone()`` copies the patch dict.
- ``backend/patcher/lora.py`` ``merge_lora_to_weight``, ``"lora"`` branch: ``weight +=
  strength · (alpha / rank if alpha else 1) · up @ down`` on the narrowed slice, in float32 for
  offline merges; ``LoraLoader.refresh`` restores its backups and re-merges whenever the list
  of identities changes, so our ``filename`` carries the group identity (files, versions, λ).
  Patches are ``("lora", (Q, ΔR_fused, None, None, None))`` with strength 1: λ and s are in ΔR.
- ``modules/processing.py``: every batch starts from ``forge_objects_original``, runs
  ``extra_networks.activate`` (which ends with ``scripts.after_extra_networks_activate``),
  then takes ``forge_objects_after_applying_lora``; ``setup_conds`` encodes the prompt with
  ``forge_objects.clip``; ``sample`` / ``sample_hr_pass`` reset ``forge_objects.unet`` and then
  call ``scripts.process_before_every_sampling`` (first pass and hires pass, after the hires
  tags were activated).
  So: the UNet/transformer patcher is cloned, patched and assigned back in
  ``process_before_every_sampling``; text-encoder patches go onto the CLIP patcher in
  ``after_extra_networks_activate`` (both ``forge_objects.clip`` and
  ``forge_objects_after_applying_lora.clip``, always re-derived from the clip we found there,
  so nothing piles up when the built-in LoRA extension skips its reset).
- ``extensions-builtin/sd_forge_lora/networks.py`` ``load_networks``: online mode is
  ``dynamic_args['online_lora']`` unless the UNet is stored in fp32/fp16/bf16; we do the same.
- Quantized storage (``backend/patcher/lora.py`` ``LoraLoader.refresh``, offline):
  bitsandbytes 4-bit weights (``bnb_quantized``) are dequantized by
  ``backend/operations_bnb.py`` ``functional_dequantize_4bit``, merged, and re-quantized by the
  layer's ``reload_weight`` (through ``.cuda()``: a GPU is needed); GGUF weights (``gguf_cls``) by
  ``backend/operations_gguf.py`` ``dequantize_tensor`` and ``gguf_cls.quantize_pytorch``, which only
  Q4_0, Q5_0 and Q8_0 implement: any other type raises ``NotImplementedError`` in the middle of
  the refresh. fp8 weights are cast to float32, merged and rounded back. So a group whose offline
  patches would hit such a weight is not added (a message says why and what to choose instead);
  online patches (``forge_online_loras``, merged at each forward by
  ``backend/operations.py`` ``get_weight_and_bias``) work on every storage.
- Step windows (``start=``/``stop=``): ``modules/sd_samplers_cfg_denoiser.py`` ``forward`` calls
  ``script_callbacks.cfg_denoiser_callback`` before each model call, and the model call
  (``backend/sampling/sampling_function.py`` ``sampling_function``) uses
  ``forge_objects.unet``, the patcher we assigned. Where the plan switches, ``on_step`` swaps
  our entries of that patcher's ``lora_patches`` (same place in the order) and calls its
  ``refresh_loras()``: ``LoraLoader.refresh`` sees other identities, puts every backed-up
  weight back and merges the new set, before this step's model call (lbw switches its
  strengths the same way). Online patches are moved to the device as ``sampling_prepare``
  moves them, since they are added after it ran.
- The loaded weights, for the basis identity of a quantized file: a parameter's original is
  ``lora_loader.backup[name]`` once an offline merge replaced it, else the parameter itself;
  it is read the way ``get_weight_and_bias`` reads it (dequantized, times ``scale_weight``).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict

import torch

from . import core, keymap
from .bases import LoadedModel
from .engine import UNKNOWN, ModelInfo, report_plan, sampling_step

_PLAIN = (torch.float32, torch.float16, torch.bfloat16)
# GGUF types whose class has a PyTorch quantizer in Forge (packages_3rdparty/gguf/quants.py
# ``quantize_blocks_pytorch``): the only ones an offline LoRA merge can write back.
GGUF_REQUANTIZABLE = ("Q4_0", "Q5_0", "Q8_0")


class ForgeAdapter:
    def __init__(self, engine, shared, dynamic_args=None, log=print):
        self.engine = engine
        self.shared = shared
        self.dynamic_args = dynamic_args if dynamic_args is not None else {}
        self.log = log
        self._patches: OrderedDict = OrderedDict()  # group identity -> {"unet": {...}, "clip": {...}}
        self._shapes: dict = {}  # id(patcher model) -> (weakref to it, {parameter name: shape or UNKNOWN})
        self._sketches: dict = {}  # id(patcher model) -> (weakref to it, {(name, rows): (sketch, storage)})
        self._keep = 2  # groups whose patches are kept: raised to every group of the last two plans
        # the pass being sampled, for on_step: [plan, identities of the groups applied, their
        # lora_patches keys]; kept here, not on our patcher, since a script after ours may
        # sample with its own clone of it (which copies our entries)
        self._sampling = None

    def install(self) -> None:
        pass

    def uninstall(self) -> None:
        self._sampling = None
        self._patches.clear()
        self._shapes.clear()
        self._sketches.clear()

    # ----------------------------------------------------------------- activation
    def activate(self, p, params_list) -> None:
        sd_model = getattr(p, "sd_model", None) or self.shared.sd_model
        p.qrlora_plan = None  # an exception below must not leave the previous plan in force
        plan = self.engine.plan([list(params.items) for params in params_list], self.model_info(sd_model))
        if plan.groups and getattr(sd_model, "forge_objects", None) is not None:
            online = self._online(sd_model)
            refused = set()
            for group in plan.all_groups():
                problem = "" if online or group.title in refused else self._unpatchable(
                    sd_model.forge_objects.unet, self._group_patches(group)["unet"])
                if problem:
                    refused.add(group.title)
                    plan.say(f"{group.title}: not applied, the model is untouched: {problem}")
            plan.keep_only(lambda g: g.title not in refused)
        self._keep = max(2, 2 * len(plan.all_groups()))
        p.qrlora_plan = plan
        report_plan(p, plan, self.engine.options, self.log)

    def deactivate(self, p) -> None:
        pass

    def after_extra_networks_activate(self, p) -> None:
        """Text-encoder patches, before the conditioning is computed."""
        sd_model = p.sd_model
        after = getattr(sd_model, "forge_objects_after_applying_lora", None)
        if after is None or getattr(after, "clip", None) is None:
            return
        base = getattr(after.clip, "_qrlora_base", after.clip)
        clip = base
        plan = getattr(p, "qrlora_plan", None)
        per_group = [(g, self._group_patches(g)["clip"]) for g in (plan.groups if plan else [])]
        per_group = [(g, patches) for g, patches in per_group if patches]
        if per_group:
            clip = base.clone()
            online = self._online(sd_model)
            for group, patches in per_group:
                self._add(clip, group, patches, online, "text encoders")
            clip._qrlora_base = base
        after.clip = clip
        if getattr(sd_model, "forge_objects", None) is not None:
            sd_model.forge_objects.clip = clip

    def process_before_every_sampling(self, p) -> None:
        """UNet / transformer patches, right before each sampling pass (those of its first step)."""
        plan = getattr(p, "qrlora_plan", None)
        self._sampling = None
        if not plan or not plan.groups:
            return
        per_group = [(g, self._group_patches(g)["unet"]) for g in plan.groups]
        per_group = [(g, patches) for g, patches in per_group if patches]
        if not per_group and not plan.switches:
            return
        objects = p.sd_model.forge_objects
        unet = objects.unet.clone()  # our own patcher: on_step may change its patches
        online = self._online(p.sd_model)
        added = [self._add(unet, group, patches, online, "UNet") for group, patches in per_group]
        objects.unet = unet
        if plan.switches:
            self._sampling = [plan, [g.identity for g in plan.groups], added]

    def on_step(self, params) -> None:
        """``on_cfg_denoiser``: at a step where a window opens or closes, our patches on the
        sampling patcher become that step's and the patcher is refreshed (re-merged); at every
        other step nothing changes."""
        if self._sampling is None:
            return
        plan, applied, keys = self._sampling
        groups = plan.groups_at(sampling_step(params))
        if [g.identity for g in groups] == applied:
            return
        p = getattr(getattr(params, "denoiser", None), "p", None)  # Sampler.initialize sets denoiser.p
        sd_model = getattr(p, "sd_model", None) or self.shared.sd_model
        unet = sd_model.forge_objects.unet  # what sampling_function calls: our clone, or a clone of it
        if unet is getattr(getattr(sd_model, "forge_objects_after_applying_lora", None), "unet", None):
            return  # never change the patcher every generation starts from
        online = self._online(sd_model)
        patches = unet.lora_patches  # changed in place: others may hold the dict
        ours = set(keys)
        items = list(patches.items())
        before = next((i for i, (k, _) in enumerate(items) if k in ours), len(items))
        others = [(k, v) for k, v in items if k not in ours]
        patches.clear()
        patches.update(others[:before])
        added = []
        for group in groups:
            group_patches = self._group_patches(group)["unet"]
            if group_patches:
                added.append(self._add(unet, group, group_patches, online, "UNet"))
        patches.update(others[before:])
        if online:  # sampling_prepare moved the patches to the device before our new ones existed
            device = getattr(unet, "current_device", None)
            dtype = getattr(unet.model, "computation_dtype", None)
            for key in added:
                _move_patches(patches[key], device, dtype)
        self._sampling = [plan, [g.identity for g in groups], added]
        unet.refresh_loras()

    # ----------------------------------------------------------------- patches
    def _add(self, patcher, group, patches, online, what) -> tuple:
        """Adds the patches; returns their identity in ``patcher.lora_patches``."""
        filename = f"qrlora:{group.title}:{group.identity}"
        accepted = patcher.add_patches(filename=filename, patches=patches,
                                       strength_patch=1.0, strength_model=1.0, online_mode=online)
        if len(accepted) != len(patches):
            missing = [k for k in patches if k not in accepted]
            self.log(f"{group.title}: {len(missing)} of {len(patches)} {what} layers not found in the model "
                     f"(first: {missing[0]})")
        return (filename, 1.0, 1.0, online)

    def _group_patches(self, group) -> dict:
        cached = self._patches.get(group.identity)
        if cached is None:
            cached = {"unet": {}, "clip": {}}
            for layer in group.layers.values():
                fp = keymap.forge_param(layer.target, group.arch)
                cached[fp.component][fp.patch_key] = ("lora", (layer.q, layer.delta, None, None, None))
            self._patches[group.identity] = cached
            while len(self._patches) > self._keep:
                self._patches.popitem(last=False)
        return cached

    @staticmethod
    def _unpatchable(patcher, patches) -> str:
        """Why Forge's offline merge would fail on one of these parameters, or ""."""
        params = dict(patcher.model.named_parameters())
        for key in patches:
            name = key if isinstance(key, str) else key[0]
            w = params.get(name)
            kind = _gguf_type(w)
            if kind and kind not in GGUF_REQUANTIZABLE:
                return (f"{name} is stored as GGUF {kind}, and Forge re-quantizes a merged LoRA only into "
                        f"{', '.join(GGUF_REQUANTIZABLE)}; choose 'Automatic (fp16 LoRA)' in 'Diffusion in Low Bits' "
                        "(LoRAs applied at each step) or a Q8_0/Q5_0/Q4_0 file")
            if getattr(w, "bnb_quantized", False) and not torch.cuda.is_available():
                return (f"{name} is stored in bitsandbytes {getattr(w, 'quant_type', '4-bit')}, which Forge re-quantizes "
                        "after a merge only on a CUDA GPU; choose a '(fp16 LoRA)' option in 'Diffusion in Low Bits'")
        return ""

    def _online(self, sd_model) -> bool:
        online = bool(self.dynamic_args.get("online_lora", False))
        storage = getattr(getattr(sd_model.forge_objects.unet, "model", None), "storage_dtype", None)
        return online and storage not in _PLAIN

    # ----------------------------------------------------------------- the model
    def model_info(self, sd_model) -> ModelInfo:
        if sd_model is None or getattr(sd_model, "forge_objects", None) is None:
            return ModelInfo(None, None, lambda t: None, "not loaded")
        repo = str(getattr(getattr(sd_model, "model_config", None), "huggingface_repo", "") or "")
        arch = "sdxl" if getattr(sd_model, "is_sdxl", False) else "flux" if "flux" in repo.lower() else None
        info = getattr(sd_model, "sd_checkpoint_info", None)
        checkpoint = getattr(info, "filename", None) or getattr(sd_model, "filename", None)
        objects = sd_model.forge_objects

        def layer_shape(target):
            try:
                fp = keymap.forge_param(target, arch)
            except KeyError:
                return None
            patcher = objects.unet if fp.component == "unet" else getattr(objects.clip, "patcher", None)
            shape = self._shapes_of(patcher).get(fp.name) if patcher is not None else None
            if shape is None or shape == UNKNOWN or fp.offset is None:
                return shape
            dim, start, length = fp.offset
            return (length, shape[1]) if start + length <= shape[0] else shape

        loaded = None
        if arch is not None:
            loaded = LoadedModel(os.path.basename(checkpoint or "") or "the loaded model",
                                 self._original_shapes(objects.unet, arch),
                                 lambda target: self._loaded_sketch(objects.unet, target, arch))
        return ModelInfo(arch, checkpoint, layer_shape, repo or type(sd_model).__name__, loaded)

    def _shapes_of(self, patcher) -> dict:
        """Parameter shapes of the patcher's model, for the current model only: kept beside a
        weak reference, so a model change frees the old checkpoint and starts afresh."""
        model = patcher.model
        held = self._shapes.get(id(model))
        if held is None or held[0]() is not model:
            shapes = {}
            for name, param in model.named_parameters():
                shape = _real_shape(param)
                shapes[name] = shape if shape is not None and len(shape) == 2 else UNKNOWN
            held = (weakref.ref(model), shapes)
            self._shapes = {k: v for k, v in self._shapes.items() if v[0]() is not None}  # models still alive
            self._shapes[id(model)] = held
        return held[1]

    def _original_shapes(self, patcher, arch) -> dict:
        """The transformer's/UNet's shapes under original-layout keys (to name a target preset)."""
        prefix = "model." if arch == "sdxl" else ""
        out = {}
        for name, param in patcher.model.named_parameters():
            shape = _real_shape(param)
            if shape is not None:
                out[prefix + name[len("diffusion_model."):] if name.startswith("diffusion_model.") else name] = shape
        return out

    def _loaded_sketch(self, patcher, target, arch):
        """(weight sketch, storage name) of a target's loaded weight before any LoRA merge,
        dequantized as Forge computes with it; once per model and layer."""
        try:
            fp = keymap.forge_param(target, arch)
        except KeyError:
            return None
        if fp.component != "unet":
            return None
        model = patcher.model
        held = self._sketches.get(id(model))
        if held is None or held[0]() is not model:
            held = (weakref.ref(model), {})
            self._sketches = {k: v for k, v in self._sketches.items() if v[0]() is not None}
            self._sketches[id(model)] = held
        key = (fp.name, fp.offset)
        if key not in held[1]:
            weight, storage = _original_weight(model, fp.name)
            if weight is None:
                return None
            if fp.offset is not None:
                weight = weight.narrow(*fp.offset)
            held[1][key] = (core.basis.weight_sketch(weight), storage)
        return held[1][key]


def _move_patches(per_key: dict, device, dtype) -> None:
    """Our ``("lora", (Q, ΔR, …))`` entries moved as ``backend/utils.py`` ``nested_move_to_device``
    moves every patch in ``sampling_prepare`` (which ``sampling_cleanup`` moves back)."""
    if device is None:
        return
    for entries in per_key.values():
        for entry in entries:
            kind, value = entry[1]
            entry[1] = (kind, tuple(v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v for v in value))


def _gguf_type(param) -> str:
    cls = getattr(param, "gguf_cls", None)
    return getattr(cls, "__name__", "") if cls is not None else ""


def _real_shape(param):
    """A parameter's logical shape: GGUF's ``real_shape`` (``.shape`` already is it), a 4-bit
    weight's ``quant_state.shape``."""
    state = getattr(param, "quant_state", None)
    if getattr(param, "bnb_quantized", False) and state is not None:
        return tuple(state.shape)
    return tuple(param.shape) if param is not None else None


def _original_weight(model, name):
    """The parameter as loaded (the offline merge's backup once it was merged), dequantized as
    ``get_weight_and_bias`` does, in float32; with its storage name."""
    loader = getattr(model, "lora_loader", None)
    weight = (getattr(loader, "backup", None) or {}).get(name)
    parent = model
    for part in name.split(".")[:-1]:
        parent = getattr(parent, part, None)
    if weight is None:
        weight = getattr(parent, name.rsplit(".", 1)[-1], None)
    if weight is None:
        return None, ""
    if getattr(weight, "bnb_quantized", False):
        from backend.operations_bnb import functional_dequantize_4bit

        storage, weight = getattr(weight, "quant_type", "nf4"), functional_dequantize_4bit(weight)
    elif getattr(weight, "gguf_cls", None) is not None:
        from backend.operations_gguf import dequantize_tensor

        storage = _gguf_type(weight)
        if not getattr(weight, "baked", True):  # baked when first loaded to the device: bake a copy
            weight = weight.to(weight.device)
            weight.gguf_cls.bake(weight)
        weight = dequantize_tensor(weight)
    else:
        storage = str(weight.dtype).replace("torch.", "")
    weight = weight.detach().to(torch.float32)
    scale = getattr(parent, "scale_weight", None)
    if scale is not None:
        weight = weight * scale.to(torch.float32)
    return weight, storage
