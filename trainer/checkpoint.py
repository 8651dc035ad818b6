"""What training leaves on disk: adapter files, the basis, and resumable state.

Every write is atomic (a temporary name, then a rename), so an interrupted save never
leaves a half-written file or state folder under the real name.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import shutil
import tempfile

import torch

from qrlora import archs, deltar
from qrlora.basis import Basis
from qrlora.checkpoint import save_atomic
from qrlora.paths import cache_root
from qrlora.errors import UserError
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
    """A ΔR file (``kind == "qrlora"``) or a kohya LoRA file (``kind == "lora"``), with
    kohya's ``sshs_*`` hashes in its metadata."""
    dtype = SAVE_DTYPES[save_precision]
    if kind == "qrlora":
        d = deltar.from_basis(basis, network.delta_r(), alpha=alpha, mask=mask, embed_q=embed_basis, metadata=metadata)
        deltar.save(d, path, dtype=dtype, output_name=output_name, base_model=base_model)
        return
    ups, downs = network.lora_factors()
    tensors = kohya_state_dict(arch, targets, ups, downs, alpha / rank, dtype)
    save_atomic(tensors, path, lora_metadata(arch, metadata, rank, alpha, output_name, base_model), model_hash=True)


def lora_metadata(arch: str, metadata: dict[str, str], rank: int, alpha: float, output_name: str,
                  base_model: str) -> dict[str, str]:
    """What WebUIs need to file a LoRA under its base model: A1111's Lora extension calls a
    file SDXL only when ``ss_base_model_version`` starts with ``sdxl_`` (and SD1 otherwise)."""
    a = archs.get(arch)
    meta = {
        "ss_base_model_version": a.base_model_version,
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation": a.modelspec_implementation,
        "modelspec.resolution": a.resolution,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.title": output_name,
    }
    meta.update(metadata)  # the run's own title and resolution win over the defaults above
    meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_output_name": output_name,
                 "ss_sd_model_name": base_model})
    return kohya_metadata(arch, meta)


# ----------------------------------------------------------------- periodic saves
def periodic_name(output_name: str, naming: str, step: int | None = None, epoch: int | None = None) -> str:
    """``NAME-step000100`` / ``NAME-epoch000002``, or with ``naming = "kohya"`` sd-scripts'
    ``NAME-step00000100`` / ``NAME-000002``."""
    if naming == "kohya":
        return f"{output_name}-step{step:08d}" if step is not None else f"{output_name}-{epoch:06d}"
    return f"{output_name}-step{step:06d}" if step is not None else f"{output_name}-epoch{epoch:06d}"


def keep_last(folder: str, output_name: str, n: int | None) -> list[str]:
    """Delete all but the newest ``n`` periodic saves (either naming, and their state folders);
    the final ``NAME.safetensors`` is never touched. Returns what was removed."""
    if not n:
        return []
    pattern = re.compile(re.escape(output_name) + r"-(step|epoch)?(\d{6}|\d{8})\.safetensors$")
    saves = []
    for path in glob.glob(os.path.join(folder, f"{glob.escape(output_name)}-*.safetensors")):
        m = pattern.fullmatch(os.path.basename(path))
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


def rescue_folders(output_name: str, session: str) -> list[str]:
    """Where a run goes when its output folder cannot be written: the qrlora cache, else the
    system's temporary folder."""
    leaf = f"{output_name}-{session}"
    return [os.path.join(cache_root(), "rescue", leaf),
            os.path.join(tempfile.gettempdir(), "qrlora-rescue", leaf)]


def shareable_paths(value, base: str):
    """``value`` with absolute paths made shareable, as kohya users share files: relative to
    the config folder ``base`` when inside it, else the last folder or file name only (a
    user's home and folder layout stay off the file)."""
    if isinstance(value, dict):
        return {k: shareable_paths(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable_paths(v, base) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        rel = os.path.relpath(value, base) if os.path.splitdrive(value)[0] == os.path.splitdrive(base)[0] else ".."
        return rel.replace(os.sep, "/") if not rel.startswith("..") else os.path.basename(os.path.normpath(value))
    return value


# ----------------------------------------------------------------- resumable state
def save_state(folder: str, network: AdapterNetwork, optimizer, scheduler, scaler, progress: dict,
               run: dict) -> None:
    """Everything needed to continue exactly: adapter tensors (float32), optimizer, scheduler
    and loss-scaler state, the random generators in use (torch's CPU one, CUDA's when
    present), the data position (``progress``: step, epoch, batches done; the data order and
    every per-batch draw are functions of the seed and that position), and ``run``: the
    resolved config, the ``--set`` overrides, the config file and the output folder.
    Written to a temporary folder, then renamed over the old one."""
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_atomic(network.adapter_state(), os.path.join(tmp, "adapter.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, os.path.join(tmp, "rng.pt"))
    for name, content in (("progress.json", {"version": STATE_VERSION, **progress}), ("run.json", run)):
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    old = f"{folder}.old-{os.getpid()}"
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_run(folder: str) -> tuple[dict, dict]:
    """(progress, run) of a state folder, checked; raises UserError naming the folder."""
    progress_path = os.path.join(folder, "progress.json")
    if not os.path.isfile(progress_path):
        raise UserError(f"saving.resume: {folder} is not a training state folder (it has no progress.json)")
    with open(progress_path, encoding="utf-8") as f:
        progress = json.load(f)
    if progress.get("version") != STATE_VERSION:
        raise UserError(f"saving.resume: {folder} has state version {progress.get('version')}, this trainer"
                        f" reads version {STATE_VERSION}")
    run = {}
    if os.path.isfile(os.path.join(folder, "run.json")):
        with open(os.path.join(folder, "run.json"), encoding="utf-8") as f:
            run = json.load(f)
    return progress, run


def load_state(folder: str, network: AdapterNetwork, optimizer, scheduler, scaler) -> dict:
    from safetensors.torch import load_file

    progress, _ = read_run(folder)
    adapter = load_file(os.path.join(folder, "adapter.safetensors"))
    network.check_adapter_state(adapter, f"saving.resume: {folder}")
    network.load_adapter_state(adapter)
    # Our own files, but loaded without unpickling arbitrary objects all the same.
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
    scaler_path = os.path.join(folder, "scaler.pt")
    if os.path.exists(scaler_path):
        scaler_state = torch.load(scaler_path, weights_only=True)
        if scaler_state:
            scaler.load_state_dict(scaler_state)
    rng = torch.load(os.path.join(folder, "rng.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])
    return progress
