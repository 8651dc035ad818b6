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
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from . import keymap
from .engine import UNKNOWN, ModelInfo, report_plan

_PLAIN = (torch.float32, torch.float16, torch.bfloat16)


class ForgeAdapter:
    def __init__(self, engine, shared, dynamic_args=None, log=print):
        self.engine = engine
        self.shared = shared
        self.dynamic_args = dynamic_args if dynamic_args is not None else {}
        self.log = log
        self._patches: OrderedDict = OrderedDict()  # group identity -> {"unet": {...}, "clip": {...}}
        self._shapes: dict = {}  # id(patcher model) -> (weakref to it, {parameter name: shape or UNKNOWN})

    def install(self) -> None:
        pass

    def uninstall(self) -> None:
        self._patches.clear()
        self._shapes.clear()

    # ----------------------------------------------------------------- activation
    def activate(self, p, params_list) -> None:
        sd_model = getattr(p, "sd_model", None) or self.shared.sd_model
        p.qrlora_plan = None  # an exception below must not leave the previous plan in force
        plan = self.engine.plan([list(params.items) for params in params_list], self.model_info(sd_model))
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
        """UNet / transformer patches, right before each sampling pass."""
        plan = getattr(p, "qrlora_plan", None)
        if not plan or not plan.groups:
            return
        per_group = [(g, self._group_patches(g)["unet"]) for g in plan.groups]
        per_group = [(g, patches) for g, patches in per_group if patches]
        if not per_group:
            return
        objects = p.sd_model.forge_objects
        unet = objects.unet.clone()
        online = self._online(p.sd_model)
        for group, patches in per_group:
            self._add(unet, group, patches, online, "UNet")
        objects.unet = unet

    # ----------------------------------------------------------------- patches
    def _add(self, patcher, group, patches, online, what) -> None:
        accepted = patcher.add_patches(filename=f"qrlora:{group.title}:{group.identity}", patches=patches,
                                       strength_patch=1.0, strength_model=1.0, online_mode=online)
        if len(accepted) != len(patches):
            missing = [k for k in patches if k not in accepted]
            self.log(f"{group.title}: {len(missing)} of {len(patches)} {what} layers not found in the model "
                     f"(first: {missing[0]})")

    def _group_patches(self, group) -> dict:
        cached = self._patches.get(group.identity)
        if cached is None:
            cached = {"unet": {}, "clip": {}}
            for layer in group.layers.values():
                fp = keymap.forge_param(layer.target, group.arch)
                cached[fp.component][fp.patch_key] = ("lora", (layer.q, layer.delta, None, None, None))
            self._patches[group.identity] = cached
            while len(self._patches) > 2:
                self._patches.popitem(last=False)
        return cached

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

        return ModelInfo(arch, checkpoint, layer_shape, repo or type(sd_model).__name__)

    def _shapes_of(self, patcher) -> dict:
        """Parameter shapes of the patcher's model, for the current model only: kept beside a
        weak reference, so a model change frees the old checkpoint and starts afresh."""
        model = patcher.model
        held = self._shapes.get(id(model))
        if held is None or held[0]() is not model:
            shapes = {}
            for name, param in model.named_parameters():
                # packed 4-bit / raw GGUF storage: the layer exists, its shape is not readable here
                plain = param.dtype.is_floating_point and len(param.shape) == 2
                shapes[name] = tuple(param.shape) if plain else UNKNOWN
            held = (weakref.ref(model), shapes)
            self._shapes = {k: v for k, v in self._shapes.items() if v[0]() is not None}  # models still alive
            self._shapes[id(model)] = held
        return held[1]
