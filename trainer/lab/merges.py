"""Combining a content adapter with a style adapter, layer by layer, for the merge study.

Every adapter is read as what it does to the model: ``{layer: ΔW}`` (out x in, float32) under
the trainer's layer names (``unet.up_blocks.0.attentions.1....to_q``). The four ways of
combining two of them:

- ``qrlora_sum``: the core's fusion (``qrlora.fusion.fuse``) of two ΔR files on one basis,
  ΔW = Q·Σ λᵢ·sᵢ·ΔRᵢ;
- ``lora_sum``: two LoRAs added, ΔW = Σ λᵢ·ΔWᵢ;
- ``ziplora``: two LoRAs merged with learned per-column coefficients (``zip_merge``);
- ``blora``: B-LoRA's block split, the content LoRA only in the content blocks and the style
  LoRA only in the style blocks (``block_split``).

The ZipLoRA merge here is ours, on the layer weights alone: the paper optimises the same
coefficients through the diffusion model on generated images; without that loop, "each
LoRA's effect on its own inputs" is its effect on its own input subspace (the row space of
its ΔW), which needs no images.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from qrlora import archs, deltar
from qrlora.basis import load_basis
from qrlora.checkpoint import FileFormatError, SafetensorsFile
from qrlora.fusion import fuse

# a transformer block of the UNet: down/up_blocks.N.attentions.M or mid_block.attentions.M
BLOCK_NAME = re.compile(r"(?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+")
_BLOCK = re.compile(r"^unet\.(" + BLOCK_NAME.pattern + r")\.")


def block_of(layer: str) -> str:
    """``unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q`` -> ``up_blocks.0.attentions.1``."""
    m = _BLOCK.match(layer)
    return m.group(1) if m else layer.split(".", 1)[0]


# ----------------------------------------------------------------- reading adapters as ΔW
def qr_file(path: str) -> tuple[deltar.DeltaR, dict[str, torch.Tensor]]:
    """A trainer's ΔR file and its Q, from the ``basis-<id>.safetensors`` the trainer writes beside it."""
    import os

    d = deltar.load(path)
    basis_path = os.path.join(os.path.dirname(path), f"basis-{d.basis_id}.safetensors")
    if d.q:
        return d, dict(d.q)
    if not os.path.isfile(basis_path):
        raise FileFormatError(f"{path}: its basis file {os.path.basename(basis_path)} is not beside it")
    return d, dict(load_basis(basis_path).q)


def qr_delta_weights(d: deltar.DeltaR, q: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: d.delta_weight(name, q[name]).float() for name in d.layers}


def lora_delta_weights(path: str, targets: Mapping[str, archs.Target], arch: str = "sdxl") -> dict[str, torch.Tensor]:
    """A kohya LoRA file (the trainer's ``type = "lora"`` output) as ΔW per trainer layer name;
    ``targets`` (e.g. a ΔR file's) say which kohya module each layer is."""
    a = archs.get(arch)
    f = SafetensorsFile(path)
    keys = set(f.keys)
    out = {}
    for name, target in targets.items():
        module, rows, _ = a.kohya_module(target)
        if rows is not None:
            raise ValueError(f"{name}: sliced kohya modules are not used by the lab")
        if f"{module}.lora_up.weight" not in keys:
            raise FileFormatError(f"{path}: no LoRA for layer {name} (kohya module {module})")
        up = f.tensor(f"{module}.lora_up.weight").float()
        down = f.tensor(f"{module}.lora_down.weight").float()
        alpha = float(f.tensor(f"{module}.alpha")) if f"{module}.alpha" in keys else float(up.shape[1])
        out[name] = (alpha / up.shape[1]) * (up @ down)
    return out


# ----------------------------------------------------------------- the merges
def qrlora_sum(items: Sequence[tuple[str, deltar.DeltaR, float]], q: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ λᵢ·ΔRᵢ on the shared basis through the core's fusion, as ΔW."""
    return qr_delta_weights(fuse(items), q)


def lora_sum(parts: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for dw, weight in parts:
        for name, w in dw.items():
            out[name] = out.get(name, torch.zeros_like(w)) + weight * w
    return out


def block_split(content: Mapping[str, torch.Tensor], style: Mapping[str, torch.Tensor],
                content_blocks: Sequence[str], style_blocks: Sequence[str],
                weights: tuple[float, float] = (1.0, 1.0)) -> dict[str, torch.Tensor]:
    """B-LoRA: each layer of a content block takes the content ΔW, of a style block the style
    ΔW; every other layer is left alone (absent from the result)."""
    out = {}
    for name in dict.fromkeys(list(content) + list(style)):
        block = block_of(name)
        if block in content_blocks and name in content:
            out[name] = weights[0] * content[name]
        if block in style_blocks and name in style:
            out[name] = out.get(name, 0) + weights[1] * style[name]
    return out


def _row_space(w: torch.Tensor) -> torch.Tensor:
    """(in, k) orthonormal basis of the row space of ``w``: the inputs this ΔW reacts to."""
    _, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return vh[s > s.max() * 1e-6].T.float()


def zip_objective(dw_c, dw_s, m_c, m_s, v_c, v_s, overlap_weight):
    """(total, preservation, overlap) of one layer's ZipLoRA merge: each LoRA's effect on its
    own input subspace kept (relative squared error), plus ``overlap_weight`` times the
    cosine between the two merger coefficient vectors (0 when they use disjoint columns)."""
    merged = dw_c * m_c + dw_s * m_s  # coefficient j scales column j (input feature j)
    keep = sum(((merged - dw) @ v).pow(2).sum() / dw.pow(2).sum().clamp(min=1e-30)
               for dw, v in ((dw_c, v_c), (dw_s, v_s)))
    overlap = torch.nn.functional.cosine_similarity(m_c, m_s, dim=0).abs()
    return keep + overlap_weight * overlap, keep, overlap


def zip_merge(content: Mapping[str, torch.Tensor], style: Mapping[str, torch.Tensor], steps: int = 200,
              learning_rate: float = 0.05, overlap_weight: float = 0.5,
              weights: tuple[float, float] = (1.0, 1.0)) -> tuple[dict[str, torch.Tensor], dict]:
    """ZipLoRA-style merge of every layer both LoRAs adapt: coefficient vectors m_c, m_s (one
    entry per column of ΔW, initialised to 1: the plain sum) learned by Adam on
    ``zip_objective``; ΔW = λ_c·ΔW_c⊙m_c + λ_s·ΔW_s⊙m_s. Returns the merged ΔW and, per
    layer, the objective and the overlap before and after."""
    out, report = {}, {}
    for name in content:
        if name not in style:
            out[name] = weights[0] * content[name]
            continue
        dw_c, dw_s = weights[0] * content[name].float(), weights[1] * style[name].float()
        v_c, v_s = _row_space(dw_c), _row_space(dw_s)
        m_c = torch.ones(dw_c.shape[1], requires_grad=True)
        m_s = torch.ones(dw_s.shape[1], requires_grad=True)
        opt = torch.optim.Adam([m_c, m_s], lr=learning_rate)
        with torch.no_grad():
            before = [float(x) for x in zip_objective(dw_c, dw_s, m_c, m_s, v_c, v_s, overlap_weight)]
        for _ in range(steps):
            total, _, _ = zip_objective(dw_c, dw_s, m_c, m_s, v_c, v_s, overlap_weight)
            opt.zero_grad()
            total.backward()
            opt.step()
        with torch.no_grad():
            after = [float(x) for x in zip_objective(dw_c, dw_s, m_c, m_s, v_c, v_s, overlap_weight)]
            out[name] = dw_c * m_c + dw_s * m_s
        report[name] = {"objective": [before[0], after[0]], "preservation": [before[1], after[1]],
                        "overlap": [before[2], after[2]]}
    for name in style:
        if name not in content:
            out[name] = weights[1] * style[name]
    return out, report


def summarise_zip(per_layer: Mapping[str, dict]) -> dict:
    """Means over layers of ZipLoRA's objective, preservation and overlap, before and after."""
    n = max(1, len(per_layer))
    return {k: [sum(r[k][i] for r in per_layer.values()) / n for i in (0, 1)]
            for k in ("objective", "preservation", "overlap")} | {"layers": len(per_layer)}


def block_energy(dw: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each block's share of Σ‖ΔW‖²: where an adapter put its change."""
    energy: dict[str, float] = {}
    for name, w in dw.items():
        energy[block_of(name)] = energy.get(block_of(name), 0.0) + float(w.double().pow(2).sum())
    total = sum(energy.values()) or 1.0
    return {block: e / total for block, e in energy.items()}
