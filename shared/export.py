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
from .archs import Target
from .deltar import DeltaR, standard_metadata
from .errors import IncompatibleFiles, UserError


def _require_q(d: DeltaR, q: Mapping[str, torch.Tensor]) -> None:
    missing = [n for n in d.layers if n not in q]
    if missing:
        raise IncompatibleFiles(f"the basis lacks {len(missing)} of the {len(d.layers)} layers of the ΔR file"
                                f" on basis {d.basis_id} (first: {missing[0]})")
    for n, dr in d.layers.items():
        if q[n].shape != (d.targets[n].shape[0], d.rank):
            raise IncompatibleFiles(f"layer {n}: the basis has Q of shape {tuple(q[n].shape)}, the rank-{d.rank} ΔR file"
                                    f" on basis {d.basis_id} needs ({d.targets[n].shape[0]}, {d.rank})")


def kohya_state_dict(
    arch_name: str,
    targets: Mapping[str, Target],
    ups: Mapping[str, torch.Tensor],
    downs: Mapping[str, torch.Tensor],
    scale: float,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """kohya-format tensors for per-layer factors with ΔW = scale·up·down.

    Layers that share one original module (fused FLUX qkv/linear1) become one module: up is
    block-diagonal (each slice's up on its rows), down the stacked downs, and alpha grows
    with the stacked rank so that alpha/rank stays ``scale``.
    """
    arch = archs.get(arch_name)
    modules: dict[str, list] = {}  # kohya module -> [(layer, rows), ...]
    full_out: dict[str, int] = {}
    for name in downs:
        target = targets[name]
        if not target.key:
            raise UserError(f"layer {name}: the file does not say where it lives in the original layout (no key)")
        module, rows, out_f = arch.kohya_module(target)
        modules.setdefault(module, []).append((name, rows))
        full_out[module] = out_f
    tensors: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        # slices in row order, so each slice's columns sit on the diagonal: loaders that split a
        # fused module (diffusers' kohya FLUX converter) see the block structure and keep rank r
        parts.sort(key=lambda part: part[1] or (0, 0))
        if len(parts) == 1 and parts[0][1] is None:
            up, down = ups[parts[0][0]], downs[parts[0][0]]
        else:
            widths = [downs[name].shape[0] for name, _ in parts]
            up = torch.zeros(full_out[module], sum(widths))
            col = 0
            for (name, rows), width in zip(parts, widths):
                start, stop = rows if rows else (0, full_out[module])
                up[start:stop, col : col + width] = ups[name]
                col += width
            down = torch.cat([downs[name] for name, _ in parts])
        tensors[f"{module}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{module}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(scale * up.shape[1], dtype=dtype)
    return tensors


def kohya_metadata(arch_name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata of a kohya LoRA file (``networks.lora``, ``…/lora`` modelspec)."""
    meta = dict(extra or {})
    arch = archs.get(arch_name)
    meta.update({"ss_network_module": "networks.lora", "modelspec.architecture": arch.modelspec_architecture})
    return meta


def to_kohya(d: DeltaR, q: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16):
    """(tensors, metadata) of a kohya-format LoRA equal to this ΔR file: up = Q, down = ΔR."""
    _require_q(d, q)
    tensors = kohya_state_dict(d.arch, d.targets, q, d.layers, d.scale, dtype)
    meta = standard_metadata(d)
    meta.update({k: v for k, v in d.metadata.items() if k.startswith(("ss_", "modelspec."))})
    meta["ss_network_args"] = "{}"
    meta["qrlora.exported_from"] = d.basis_id
    return tensors, kohya_metadata(d.arch, meta)


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
