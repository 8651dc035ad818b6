"""Test material shared by the extension tests: ΔR files written by the core on the tiny SDXL's
basis, their exported standard LoRAs, the expected ΔW, and weight access in each host."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from qrlora_ext import keymap
from qrlora import deltar, export
from qrlora.basis import BasisCache, basis_from_checkpoint
from qrlora.checkpoint import save_atomic

RANK = 4
TARGETS = ["sdxl-all", "sdxl-te"]


@dataclass
class World:
    root: str
    checkpoint: str
    basis: object
    qrlora_dir: str
    lora_dir: str
    basis_dir: str
    files: dict = field(default_factory=dict)  # name -> loaded DeltaR (what is on disk)
    _dw: dict = field(default_factory=dict)  # (file, layer) -> s·Q·ΔR in float64

    def delta_w(self, weights: dict[str, float], name: str, te: dict | None = None) -> torch.Tensor:
        """Σ λ·s·Q·ΔR for one layer; ``te`` overrides λ on text-encoder layers."""
        total = None
        for file, lam in weights.items():
            d = self.files[file]
            if name not in d.layers:
                continue
            if te is not None and keymap.is_text_encoder(name):
                lam = te[file]
            key = (file, id(d), name)
            if key not in self._dw:
                self._dw[key] = d.scale * (self.basis.q[name].double() @ d.layers[name].double())
            term = lam * self._dw[key]
            total = term if total is None else total + term
        return total


def write_file(world: World, name: str, seed: int, alpha: float, scale: float = 0.3, **kw) -> str:
    from tests.helpers import random_delta_r

    d = deltar.from_basis(world.basis, random_delta_r(world.basis, seed=seed, scale=scale), alpha=alpha, **kw)
    path = os.path.join(world.qrlora_dir, f"{name}.safetensors")
    deltar.save(d, path, output_name=name)
    world.files[name] = deltar.load(path)
    return path


def export_lora(world: World, name: str, lora_name: str) -> str:
    tensors, meta = export.to_kohya(world.files[name], world.basis.q, torch.float32)
    path = os.path.join(world.lora_dir, f"{lora_name}.safetensors")
    save_atomic(tensors, path, meta)
    return path


def make_world(root: str, checkpoint: str) -> World:
    basis = basis_from_checkpoint(checkpoint, RANK, targets=TARGETS)
    w = World(root, checkpoint, basis, os.path.join(root, "QRLoRA"), os.path.join(root, "Lora"),
              os.path.join(root, "QRLoRA", "basis"))
    for d in (w.qrlora_dir, w.lora_dir):
        os.makedirs(d, exist_ok=True)
    write_file(w, "dog", seed=1, alpha=2.0)
    write_file(w, "style", seed=2, alpha=4.0)
    export_lora(w, "dog", "dog_lora")
    export_lora(w, "style", "style_lora")
    BasisCache(w.basis_dir)  # the folder is created on first store
    return w


# ----------------------------------------------------------------- weights in the hosts
def parameters(host) -> dict[str, torch.Tensor]:
    """Every parameter of the loaded model (copies), by a host-specific name."""
    sd = host.sd_model
    if host.kind == "a1111":
        return {n: p.detach().clone() for n, p in sd.named_parameters()}
    out = {"unet:" + n: p.detach().clone() for n, p in sd.forge_objects_original.unet.model.named_parameters()}
    out.update({"clip:" + n: p.detach().clone()
                for n, p in sd.forge_objects_original.clip.cond_stage_model.named_parameters()})
    return out


def target_weight(host, target) -> tuple[str, torch.Tensor]:
    """(parameter name in ``parameters``, the target's current weight rows)."""
    sd = host.sd_model
    if host.kind == "a1111":
        loc = keymap.a1111_layer(target)
        module = sd.network_layer_mapping[loc.layer_name]
        names = getattr(sd, "_names_by_id", None)
        if names is None:
            names = sd._names_by_id = {id(m): n for n, m in sd.named_modules()}
        if loc.qkv is not None:
            return names[id(module)] + ".in_proj_weight", module.in_proj_weight[target.rows[0]:target.rows[1]]
        return names[id(module)] + ".weight", module.weight
    fp = keymap.forge_param(target, "sdxl")
    model = sd.forge_objects_original.unet.model if fp.component == "unet" else sd.forge_objects_original.clip.cond_stage_model
    param = dict(model.named_parameters())[fp.name]
    if fp.offset:
        param = param.narrow(*fp.offset)
    return f"{fp.component}:{fp.name}", param


def original_rows(original: dict, host, target, key: str) -> torch.Tensor:
    w = original[key]
    if host.kind == "a1111" and target.rows:
        return w[target.rows[0]:target.rows[1]]
    return w


def check_applied(host, world: World, original: dict, weights: dict[str, float], te: dict | None = None,
                  atol: float = 1e-6) -> None:
    """Every targeted weight is W + Σλ·s·Q·ΔR; every other parameter is bit-exact W."""
    touched = set()
    for target in world.basis.targets:
        name = target.name
        key, current = target_weight(host, target)
        touched.add(key)
        expected = original_rows(original, host, target, key).double()
        dw = world.delta_w(weights, name, te)
        if dw is not None:
            expected = expected + dw
        err = (current.double() - expected).abs().max().item()
        assert err <= atol, f"{name}: off by {err:.3g}"
    for key, value in parameters(host).items():
        if key not in touched:
            assert torch.equal(value, original[key]), f"{key} changed"


def check_original(host, original: dict) -> None:
    for key, value in parameters(host).items():
        assert torch.equal(value, original[key]), f"{key} not restored bit-exactly"


def open_host(kind: str, world: World, basis_dir: str | None = None, checkpoint: str | None = None):
    """A stand-in host of ``kind`` with the tiny SDXL loaded (optionally pretending the model's
    checkpoint file is ``checkpoint``) and its original parameters recorded."""
    from tests.hosts import models
    from tests.hosts.harness import Host

    h = Host(kind, world.root, world.qrlora_dir, lora_dir=world.lora_dir, basis_dir=basis_dir or world.basis_dir)
    sd = models.a1111_sdxl(world.checkpoint) if kind == "a1111" else models.forge_sdxl(world.checkpoint)
    if checkpoint is not None:
        sd.sd_checkpoint_info.filename = sd.filename = checkpoint
    h.load_model(sd)
    h.original = parameters(h)
    return h
