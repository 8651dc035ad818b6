"""A ΔR file plus its basis is an ordinary LoRA: up = Q, down = ΔR⊙M, alpha = s·r.

``to_kohya`` writes kohya's key format (A1111 ``<lora:>``, Forge, ComfyUI, diffusers all read
it): SDXL under SGM names, FLUX under the fused BFL modules, where the targets that share a
fused weight become one module with a block-diagonal up (each slice's Q on its rows) and the
ΔRs stacked as down, so up·down reproduces every slice exactly.
``to_diffusers`` writes PEFT-style ``lora_A``/``lora_B`` keys under diffusers module names,
with s folded into ``lora_A`` because that format carries no alpha.
"""

from __future__ import annotations

from typing import Mapping

import torch

from . import archs
from .deltar import DeltaR, standard_metadata


def _require_q(d: DeltaR, q: Mapping[str, torch.Tensor]) -> None:
    missing = [n for n in d.layers if n not in q]
    if missing:
        raise ValueError(f"the basis lacks {len(missing)} layers of this ΔR file (first: {missing[0]})")
    for n, dr in d.layers.items():
        if q[n].shape != (d.targets[n].shape[0], d.rank):
            raise ValueError(f"basis Q of {n} has shape {tuple(q[n].shape)}, expected ({d.targets[n].shape[0]}, {d.rank})")


def to_kohya(d: DeltaR, q: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16):
    """(tensors, metadata) of a kohya-format LoRA equal to this ΔR file."""
    _require_q(d, q)
    arch = archs.get(d.arch)
    modules: dict[str, list] = {}  # kohya module -> [(target, rows), ...], full out
    full_out: dict[str, int] = {}
    for name in d.layers:
        target = d.targets[name]
        if not target.key:
            raise ValueError(f"layer {name}: the file does not say where it lives in the original layout")
        module, rows, out_f = arch.kohya_module(target)
        modules.setdefault(module, []).append((name, rows))
        full_out[module] = out_f
    tensors: dict[str, torch.Tensor] = {}
    r = d.rank
    for module, parts in modules.items():
        if len(parts) == 1 and parts[0][1] is None:
            name = parts[0][0]
            up, down = q[name], d.layers[name]
        else:
            up = torch.zeros(full_out[module], r * len(parts))
            downs = []
            for i, (name, rows) in enumerate(parts):
                start, stop = rows if rows else (0, full_out[module])
                up[start:stop, i * r : (i + 1) * r] = q[name]
                downs.append(d.layers[name])
            down = torch.cat(downs)
        rank = up.shape[1]
        tensors[f"{module}.lora_up.weight"] = up.to(dtype)
        tensors[f"{module}.lora_down.weight"] = down.to(dtype)
        tensors[f"{module}.alpha"] = torch.tensor(d.scale * rank, dtype=dtype)
    meta = standard_metadata(d)
    meta.update({k: v for k, v in d.metadata.items() if k.startswith(("ss_", "modelspec."))})
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_args": "{}",
            "modelspec.architecture": arch.modelspec_architecture,
            "qrlora.exported_from": d.basis_id,
        }
    )
    return tensors, meta


def to_diffusers(d: DeltaR, q: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16):
    """(tensors, metadata) in diffusers' PEFT LoRA format (``pipe.load_lora_weights``)."""
    _require_q(d, q)
    arch = archs.get(d.arch)
    tensors: dict[str, torch.Tensor] = {}
    for name, dr in d.layers.items():
        component, path = name.split(".", 1)
        prefix = arch.diffusers_components.get(component, component)
        tensors[f"{prefix}.{path}.lora_A.weight"] = (dr * d.scale).to(dtype)
        tensors[f"{prefix}.{path}.lora_B.weight"] = q[name].to(dtype)
    return tensors, {"format": "pt", "qrlora.exported_from": d.basis_id}
