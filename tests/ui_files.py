"""The folder the tools page is tested on: real files made from the tiny SDXL checkpoint."""

import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from qrlora import deltar
from qrlora.basis import BasisCache, basis_from_checkpoint, save_basis
from qrlora.checkpoint import SafetensorsFile
from tests.helpers import random_delta_r
from tests.official_reference import official_qr

RANK = 4


@dataclass
class UIFolder:
    folder: str
    cache: str
    checkpoint: str
    basis: object  # the rank-4 basis of the checkpoint


def make_ui_folder(folder: str, checkpoint: str) -> UIFolder:
    """In ``folder``: ``basis-r4`` (the checkpoint's rank-4 basis), ΔR files ``dog`` and
    ``style`` on it, ``other`` on the rank-2 basis (another basis), ``official`` in the
    official QR-LoRA layout (the official maths' Q and R, a triu ΔR). A cache folder beside it
    already holds the rank-4 basis, so tools that start from the checkpoint hit it."""
    os.makedirs(folder, exist_ok=True)
    cache = os.path.join(os.path.dirname(folder), os.path.basename(folder) + "-cache")
    basis = basis_from_checkpoint(checkpoint, RANK)
    BasisCache(cache).store(basis, checkpoint)
    save_basis(basis, os.path.join(folder, "basis-r4.safetensors"))
    for seed, name in ((1, "dog"), (2, "style")):
        f = deltar.from_basis(basis, random_delta_r(basis, seed=seed), alpha=RANK, mask="triu")
        deltar.save(f, os.path.join(folder, f"{name}.safetensors"), torch.float32, output_name=name)
    other_basis = basis_from_checkpoint(checkpoint, 2)
    other = deltar.from_basis(other_basis, random_delta_r(other_basis, seed=3), alpha=2, mask="triu")
    deltar.save(other, os.path.join(folder, "other.safetensors"), torch.float32, output_name="other")
    write_official(os.path.join(folder, "official.safetensors"), checkpoint, basis)
    return UIFolder(folder, cache, checkpoint, basis)


def write_official(path: str, checkpoint: str, basis, seed: int = 0) -> None:
    ckpt = SafetensorsFile(checkpoint)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in basis.targets:
        w = ckpt.tensor(t.key)[slice(*t.rows) if t.rows else slice(None)].float()
        q, r = official_qr(w, RANK)
        tensors[f"{t.name}.lora.q.weight"] = q.contiguous()
        tensors[f"{t.name}.lora.delta_r.weight"] = torch.triu(torch.randn(RANK, t.shape[1], generator=g) * 0.1)
        tensors[f"{t.name}.lora.base_r.weight"] = r.contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
