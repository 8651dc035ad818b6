"""Where a FLUX run's QR-LoRA basis comes from, settled before any weight is loaded.

The basis needs the 16-bit weights as stored: they are read from the transformer's file (never
from the loaded, possibly cast, module). A transformer stored only in fp8 needs ``model.basis``:
a basis file made once from the 16-bit release (``qrlora basis``), or that 16-bit file itself;
without one the run stops naming the command that makes it. A basis file's header is checked
here (architecture, rank); its layers and its record of the weights it was made from are
checked against the loaded model by ``trainer.setup``.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from qrlora import archs
from qrlora.archs.flux import Flux, checkpoint_prefix
from qrlora.checkpoint import SafetensorsFile, read_header
from qrlora.errors import UserError

from ..schema import ConfigError
from . import sdxl_load as L

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


# ----------------------------------------------------------------- the basis weights
def _basis_reader(path: str) -> Callable[[str], torch.Tensor | None]:
    """Layer name -> its weight read from a BFL single file (any prefix), rows sliced; None
    when it is stored in fp8 (a basis never comes from quantized weights)."""
    ckpt = SafetensorsFile(path)
    own = {t.name: t for t in Flux().linear_targets(ckpt.shapes())}

    def read(name: str) -> torch.Tensor | None:
        t = own.get(name)
        if t is None:
            raise KeyError(f"{path}: no FLUX layer {name}")
        if ckpt.dtype_name(t.key) in FP8_DTYPES:
            return None
        w = ckpt.tensor(t.key)
        return w[t.rows[0]:t.rows[1]] if t.rows else w

    return read


def _folder_basis_reader(folder: str) -> tuple[Callable[[str], torch.Tensor | None], set[str]]:
    """The folder's reader (as ``_basis_reader``) and the dtype names its 2-D weights are stored in."""
    files: dict[str, SafetensorsFile] = {}
    for path in L.component_weight_files(folder):
        ckpt = SafetensorsFile(path)
        files.update({k: ckpt for k in ckpt.keys})
    stored = {f.dtype_name(k) for k, f in files.items() if k.endswith(".weight") and len(f.shape(k)) == 2}

    def read(name: str) -> torch.Tensor | None:
        key = name.removeprefix("transformer.") + ".weight"
        if key not in files:
            raise KeyError(f"{folder}: no FLUX layer {name}")
        return None if files[key].dtype_name(key) in FP8_DTYPES else files[key].tensor(key)

    return read, stored


def basis_command(transformer_path: str, rank: int | None, targets, schnell: bool) -> tuple[str, str]:
    """(the command that makes the basis of an fp8-stored transformer from its 16-bit release,
    BFL's file name; the basis file it writes, beside the fp8 file)."""
    from qrlora.basis import basis_command as command

    stem = os.path.splitext(os.path.basename(os.path.normpath(transformer_path)))[0]
    output = os.path.join(os.path.dirname(os.path.abspath(transformer_path)), f"{stem}-basis-r{rank or 16}.safetensors")
    return command(f"flux1-{'schnell' if schnell else 'dev'}.safetensors", rank or 16,
                   targets or Flux().default_preset, output), output


def resolve_basis(model_cfg, transformer, rank: int | None, needs_basis: bool, targets=None):
    """(basis_source, base_weight, basis_file, dtype names the transformer's weights are stored in,
    the command that makes its basis) for ``transformer`` (``flux_load``'s source: path, option, folder).
    A basis file is checked here for what its header says (architecture, rank); its layers and
    its record of the weights are checked against the loaded model by ``trainer.setup``."""
    if transformer.folder:
        read, stored = _folder_basis_reader(transformer.path)
        source, fp8 = None, read("transformer.transformer_blocks.0.attn.to_q") is None
        schnell = not any(k.startswith("time_text_embed.guidance_embedder") for k in _folder_keys(transformer.path))
    else:
        ckpt = SafetensorsFile(transformer.path)
        stored = {ckpt.dtype_name(t.key) for t in Flux().linear_targets(ckpt.shapes())}
        fp8, source = bool(stored & set(FP8_DTYPES)), transformer.path
        read = _basis_reader(transformer.path)
        schnell = not any("guidance_in." in k for k in ckpt.keys)
    command, output = basis_command(transformer.path, rank, targets, schnell)
    basis = getattr(model_cfg, "basis", None)
    if basis:
        if not os.path.isfile(basis):
            raise ConfigError([f"model.basis: {basis} does not exist; make it with `{command}`"])
        header, meta, _ = read_header(basis)
        if meta.get("qrlora.kind") == "basis":
            from qrlora.errors import IncompatibleFiles

            arch, made_rank = meta.get("qrlora.arch", ""), meta.get("qrlora.rank", "")
            if arch != "flux":
                title = archs.get(arch).title if arch in archs.names() else repr(arch)
                raise IncompatibleFiles(f"model.basis: {basis} is a basis of {title}, and {transformer.option} "
                                        f"{transformer.path} is FLUX.1; make its basis with `{command}`")
            if rank is not None and made_rank != str(rank):
                raise ConfigError([f"model.basis: {basis} is a rank-{made_rank} basis and network.rank is {rank}; set "
                                   f"network.rank = {made_rank}, or make a rank-{rank} basis with `{command}`"])
            return None, lambda name: None, basis, stored, command
        if checkpoint_prefix(header.keys()) is None:
            raise UserError(f"model.basis: {basis} is neither a QR-LoRA basis file (`{command}`) "
                            "nor a FLUX.1 transformer file")
        if _is_fp8_file(SafetensorsFile(basis)):
            raise UserError(f"model.basis: {basis} is stored in fp8; the basis must come from the 16-bit (bf16/fp16) "
                            "weights of the same model")
        return basis, _basis_reader(basis), None, stored, command
    if fp8:
        if needs_basis:
            raise ConfigError([
                f"{transformer.option}: {transformer.path} stores the FLUX transformer in fp8 and a QR-LoRA basis must "
                f"come from 16-bit weights: make it once from the bf16 file of the same model with `{command}` and set "
                f'model.basis = "{output}" (or model.basis = that bf16 file)'])
        return None, lambda name: None, None, stored, command
    return source, read, None, stored, command


def _folder_keys(folder: str) -> list[str]:
    return [k for path in L.component_weight_files(folder) for k in SafetensorsFile(path).keys]


def _is_fp8_file(ckpt: SafetensorsFile) -> bool:
    """True if the FLUX transformer's linear weights in this file are stored in fp8."""
    return any(ckpt.dtype_name(t.key) in FP8_DTYPES for t in Flux().linear_targets(ckpt.shapes()))
