"""What training leaves on disk: adapter files, the basis, and resumable state.

Every write is atomic (a temporary name, then a rename), so an interrupted save never
leaves a half-written file or state folder under the real name.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch

from qrlora import deltar
from qrlora.basis import Basis
from qrlora.checkpoint import save_atomic
from qrlora.export import kohya_metadata, kohya_state_dict
from trainer.network import AdapterNetwork

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_VERSION = 1


def save_adapter(
    path: str,
    network: AdapterNetwork,
    kind: str,
    basis: Basis | None,
    arch: str,
    rank: int,
    alpha: float,
    mask: str,
    save_precision: str,
    metadata: dict[str, str],
    output_name: str,
    base_model: str,
    embed_basis: bool = False,
    targets=None,
) -> None:
    """A ΔR file (``kind == "qrlora"``) or a kohya LoRA file (``kind == "lora"``)."""
    dtype = SAVE_DTYPES[save_precision]
    if kind == "qrlora":
        d = deltar.from_basis(basis, network.delta_r(), alpha=alpha, mask=mask, embed_q=embed_basis, metadata=metadata)
        deltar.save(d, path, dtype=dtype, output_name=output_name, base_model=base_model)
        return
    ups, downs = network.lora_factors()
    tensors = kohya_state_dict(arch, targets, ups, downs, alpha / rank, dtype)
    meta = dict(metadata)
    meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_output_name": output_name,
                 "ss_sd_model_name": base_model, "modelspec.title": output_name})
    save_atomic(tensors, path, kohya_metadata(arch, meta))


def keep_last(folder: str, output_name: str, n: int | None) -> list[str]:
    """Delete all but the newest ``n`` periodic saves (``NAME-step000123.safetensors`` and their
    state folders); the final ``NAME.safetensors`` is never touched. Returns what was removed."""
    if not n:
        return []
    pattern = re.compile(re.escape(output_name) + r"-(step|epoch)(\d+)\.safetensors$")
    saves = []
    for path in glob.glob(os.path.join(folder, f"{glob.escape(output_name)}-*.safetensors")):
        m = pattern.search(os.path.basename(path))
        if m:
            saves.append((os.path.getmtime(path), path))
    removed = []
    for _, path in sorted(saves)[:-n]:
        os.remove(path)
        removed.append(path)
        state = path[: -len(".safetensors")] + "-state"
        if os.path.isdir(state):
            shutil.rmtree(state)
    return removed


# ----------------------------------------------------------------- resumable state
def save_state(folder: str, network: AdapterNetwork, optimizer, scheduler, progress: dict,
               generator: torch.Generator) -> None:
    """Everything needed to continue exactly: adapter tensors, optimizer and scheduler state,
    the noise generator and the data position (``progress``: step, epoch, batch)."""
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_atomic(network.adapter_state(), os.path.join(tmp, "adapter.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "progress.json"), "w", encoding="utf-8") as f:
        json.dump({"version": STATE_VERSION, **progress}, f, indent=1)
    old = f"{folder}.old-{os.getpid()}"
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: str, network: AdapterNetwork, optimizer, scheduler, generator: torch.Generator) -> dict:
    from safetensors.torch import load_file

    progress_path = os.path.join(folder, "progress.json")
    if not os.path.exists(progress_path):
        raise FileNotFoundError(f"{folder}: not a training state folder (no progress.json)")
    with open(progress_path, encoding="utf-8") as f:
        progress = json.load(f)
    if progress.get("version") != STATE_VERSION:
        raise ValueError(f"{folder}: state version {progress.get('version')} is not {STATE_VERSION}")
    network.load_adapter_state(load_file(os.path.join(folder, "adapter.safetensors")))
    # Our own files, but loaded without unpickling arbitrary objects all the same.
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
    rng = torch.load(os.path.join(folder, "rng.pt"), weights_only=True)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    return progress
