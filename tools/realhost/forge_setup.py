"""Prepare the real Forge for the full-size fp8 FLUX.1-dev check on a CPU, offline.

    python tools/realhost/forge_setup.py \\
        --forge-git-dir /path/to/stable-diffusion-webui-forge/.git --work /tmp/realhost/forge

Run it with this project's Python (the ``qrlora`` command writes the basis, ΔR and LoRA files
with the code under test). Every step is idempotent: a rerun skips what is already there.

1. ``WORK/webui``: Forge at the pinned commit (``git archive``), with the empty
   ``repositories/stable-diffusion-webui-assets`` its UI mounts; BLIP and the
   ``huggingface_guess`` clone are left out (Forge only warns), the latter replaced by the
   identical PyPI wheel ``huggingface-guess==0.1.0``.
2. ``WORK/venv``: ``torch==2.13.0`` (CPU) and Forge's ``requirements_versions.txt`` through the
   A1111 setup's helpers (torch constrained, ``setuptools>=77.0.3,<81`` instead of 69.5.1,
   torchvision patched when its CUDA-only ops are missing, ``clip-anytorch`` without
   dependencies), plus ``huggingface-guess==0.1.0`` and ``joblib`` (the built-in
   soft_inpainting script imports it).
3. This project symlinked as ``extensions/qrlora``, and ``tools/realhost/forge_weight_dump`` as
   ``extensions/qrlora-weight-dump`` (the check's weight dump; inactive unless the check sets
   ``QRLORA_DUMP_DIR``).
4. The model files, written tensor by tensor in Forge's own venv (``forge_weights.py``),
   never holding a whole state dict: ``WORK/files/flux1-dev-rand-bf16.safetensors`` (the
   FLUX.1-dev transformer at full size with random weights, BFL names: "the 16-bit original"),
   and the single file Forge loads, ``models/Stable-diffusion/flux1-dev-rand-fp8.safetensors``:
   the same transformer cast to float8_e4m3fn, a random T5-XXL in float8_e4m3fn, CLIP-L and the
   AE in fp16. Names and shapes come from Forge's own classes built on the meta device.
5. With this project's ``qrlora``: the basis of a few layers from the bf16 file, copied into
   Forge's basis folder (``models/QRLoRA-basis``), a random ΔR on it
   (``models/QRLoRA/flux-dog.safetensors``) and its kohya export
   (``models/Lora/flux-dog-kohya.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from a1111_setup import PROJECT, log, prepare_venv, run  # noqa: E402  (the A1111 setup's venv helpers)
from qrlora.checkpoint import atomic_output  # noqa: E402

COMMIT = "dfdcbab685e57677014f05a3309b48cc87383167"  # "Fix SD upscale Batch count (#2950)"
EXTRA_PACKAGES = ["huggingface-guess==0.1.0", "joblib"]
BF16_NAME = "flux1-dev-rand-bf16.safetensors"
FP8_NAME = "flux1-dev-rand-fp8.safetensors"
RANK = 4
# a small target set, one of each kind the check compares: a fused qkv's three row slices,
# linear1's four (q, k, v, MLP in) and a whole, unfused layer
TARGETS = ["transformer.transformer_blocks.0.attn.to_[qkv]", "transformer.single_transformer_blocks.0.attn.to_[qkv]",
           "transformer.single_transformer_blocks.0.proj_mlp", "transformer.transformer_blocks.1.attn.to_out.0"]
DELTA_SCALE = 0.5  # ΔR entries ~ N(0, 0.5²): 0.7·Q·ΔR is well above fp8's rounding of the weights
DELTA_NAME = "flux-dog"
LORA_NAME = "flux-dog-kohya"


def paths(work: str) -> dict:
    webui = os.path.join(work, "webui")
    return {
        "webui": webui,
        "python": os.path.join(work, "venv", "bin", "python"),
        "files": os.path.join(work, "files"),
        "bf16": os.path.join(work, "files", BF16_NAME),
        "basis": os.path.join(work, "files", f"basis-r{RANK}.safetensors"),
        "fp8": os.path.join(webui, "models", "Stable-diffusion", FP8_NAME),
        "qrlora_dir": os.path.join(webui, "models", "QRLoRA"),
        "basis_dir": os.path.join(webui, "models", "QRLoRA-basis"),
        "lora_dir": os.path.join(webui, "models", "Lora"),
        "delta": os.path.join(webui, "models", "QRLoRA", DELTA_NAME + ".safetensors"),
        "lora": os.path.join(webui, "models", "Lora", LORA_NAME + ".safetensors"),
    }


# ------------------------------------------------------------------ 1. the Forge tree
def extract_forge(git_dir: str, webui: str) -> None:
    marker = os.path.join(webui, ".qrlora-extracted")
    if os.path.isfile(marker) and open(marker).read().strip() == COMMIT:
        log(f"forge: {COMMIT[:7]} present")
    else:
        os.makedirs(webui, exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", git_dir, "archive", COMMIT], check=True,
                                 stdout=subprocess.PIPE).stdout
        subprocess.run(["tar", "-x", "-C", webui], input=archive, check=True)
        with open(marker, "w") as f:
            f.write(COMMIT + "\n")
        log(f"forge: {COMMIT[:7]} extracted into {webui}")
    os.makedirs(os.path.join(webui, "repositories", "stable-diffusion-webui-assets"), exist_ok=True)


# ------------------------------------------------------------------ 2. the venv
def prepare_forge_venv(webui: str, work: str, python: str) -> str:
    py = prepare_venv(webui, work, python)
    marker = os.path.join(work, "venv", ".forge-extras-done")
    if not os.path.isfile(marker):
        run([py, "-m", "pip", "install", "--quiet", *EXTRA_PACKAGES, "-c", os.path.join(work, "constraints.txt")])
        with open(marker, "w") as f:
            f.write("ok\n")
    return py


# ------------------------------------------------------------------ 3. the extension
def link_extension(webui: str) -> None:
    """This project as ``extensions/qrlora``; the check's weight dump as ``extensions/qrlora-weight-dump``
    (inactive unless the check sets ``QRLORA_DUMP_DIR``)."""
    for name, target in (("qrlora", PROJECT), ("qrlora-weight-dump", os.path.join(HERE, "forge_weight_dump"))):
        link = os.path.join(webui, "extensions", name)
        if not os.path.islink(link):
            os.symlink(target, link)
        log(f"extension: {link} -> {target}")


# ------------------------------------------------------------------ 4. the model files
# Run in Forge's venv: the names, shapes of every tensor of the single file, from Forge's own
# classes built on the meta device (so nothing is allocated), as Forge's loader names them.
LAYOUT_SNIPPET = r"""
import json, os, sys
import torch
sys.argv = [sys.argv[0], "--always-cpu", "--skip-torch-cuda-test"]
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "packages_3rdparty")]  # as Forge's launch does
import huggingface_guess
from transformers import CLIPTextConfig, CLIPTextModel
from backend.nn.clip import IntegratedCLIP
from backend.nn.flux import IntegratedFluxTransformer2DModel
from backend.nn.t5 import IntegratedT5
from backend.nn.vae import IntegratedAutoencoderKL
from backend.utils import read_arbitrary_config

repo = os.path.join("backend", "huggingface", "black-forest-labs", "FLUX.1-dev")
# the keys Forge's detection reads for FLUX.1-dev (it fixes everything else), and enough others
# under the prefix (more than 5) for huggingface_guess to take it as the transformer's
shapes = {"double_blocks.0.img_attn.norm.key_norm.scale": [128], "guidance_in.in_layer.weight": [3072, 256],
          "img_in.weight": [3072, 64], "txt_in.weight": [3072, 4096], "time_in.in_layer.weight": [3072, 256],
          "vector_in.in_layer.weight": [3072, 768]}
probe = {"model.diffusion_model." + k: torch.empty(v, device="meta") for k, v in shapes.items()}
guess = huggingface_guess.guess(probe)
with torch.device("meta"):
    parts = [
        ("model.diffusion_model.", IntegratedFluxTransformer2DModel(**guess.unet_config)),
        ("text_encoders.clip_l.", IntegratedCLIP(CLIPTextModel, CLIPTextConfig.from_pretrained(os.path.join(repo, "text_encoder")),
                                                 add_text_projection=True)),
        ("text_encoders.t5xxl.", IntegratedT5(read_arbitrary_config(os.path.join(repo, "text_encoder_2")))),
        ("vae.", IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(repo, "vae")))),
    ]
skip = ("logit_scale", "transformer.text_model.embeddings.position_ids")  # Forge ignores these
layout = [[prefix + k, list(v.shape)] for prefix, m in parts for k, v in m.state_dict().items() if k not in skip]
json.dump({"repo": guess.huggingface_repo, "unet_config": guess.unet_config, "tensors": layout}, open(os.environ["QRLORA_LAYOUT_OUT"], "w"))
print(f"layout: {len(layout)} tensors, repo {guess.huggingface_repo}")
"""
TRANSFORMER = "model.diffusion_model."
FP8_PARTS = (TRANSFORMER, "text_encoders.t5xxl.")  # stored float8_e4m3fn; CLIP-L and the AE fp16
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def forge_layout(py: str, webui: str, files: str) -> dict:
    path = os.path.join(files, "layout.json")
    if not os.path.isfile(path):
        script = os.path.join(files, "forge_layout.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(LAYOUT_SNIPPET)
        run([py, script], cwd=webui,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "QRLORA_LAYOUT_OUT": path})
    with open(path, encoding="utf-8") as f:
        return json.load(f)


POOL = 1 << 24  # values in the shared pool of N(0, 1) draws


class RandomValues:
    """Seeded random values at memory speed. Drawing FLUX.1-dev's ~17 billion values with
    ``torch.randn`` takes hours on a shared 2-core machine, so one pool of 2^24 N(0, 1) values
    is drawn once, and each tensor is made of pool runs: every 2^24 values of a tensor start at
    an offset drawn from a generator seeded by the tensor's name (the same values whatever the
    order, and rows that do not repeat the rows before them). Scaled as a trained model
    roughly is: randn/sqrt(fan_in) for matrices and kernels, 1 + 0.02·randn for norm scales,
    0.02·randn for biases; the scaled pool is kept per (scale, shift, dtype)."""

    def __init__(self, seed: int = 0):
        self.normal = torch.randn(POOL, generator=torch.Generator().manual_seed(seed))
        self._scaled: dict = {}

    @staticmethod
    def kind(name: str, shape: list[int]) -> tuple[float, float]:
        if len(shape) >= 2:
            return 1.0 / math.sqrt(math.prod(shape[1:])), 0.0
        if any(w in name for w in ("norm", "scale", "ln_")) and name.endswith(("weight", "scale")):
            return 0.02, 1.0
        return 0.02, 0.0

    def pool(self, scale: float, shift: float, dtype: torch.dtype) -> torch.Tensor:
        key = (scale, shift, dtype)
        if key not in self._scaled:
            if len(self._scaled) >= 24:  # FLUX alternates ~8 per block; at most ~0.8 GB
                self._scaled.pop(next(iter(self._scaled)))
            # bf16 first, then the target dtype: the fp8 copy is the bf16 original cast, as an
            # fp8 file made from a bf16 one is
            self._scaled[key] = (self.normal * scale + shift).to(torch.bfloat16).to(dtype)
        return self._scaled[key]

    def runs(self, name: str, shape: list[int]) -> list[tuple[int, int]]:
        """(pool offset, length) runs that make the tensor, in order."""
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        n, out = math.prod(shape), []
        for start in range(0, n, POOL):
            offset, length = int(torch.randint(POOL, (1,), generator=g)), min(POOL, n - start)
            first = min(length, POOL - offset)
            out.append((offset, first))
            if first < length:
                out.append((0, length - first))
        return out

    def chunks(self, name: str, shape: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        pool = self.pool(*self.kind(name, shape), dtype)
        return [pool[offset:offset + length] for offset, length in self.runs(name, shape)]


class SafetensorsWriter:
    """A safetensors file written one tensor at a time (the header first, from the shapes),
    through the project's atomic write; the tensors must come in the order given."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, list[int]]], metadata: dict):
        header, offset = {"__metadata__": metadata}, 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        self.header = raw + b" " * (-len(raw) % 8)
        self.order = [e[0] for e in entries]
        self.path = path

    def __enter__(self):
        self._ctx = atomic_output(self.path)
        self._file = open(self._ctx.__enter__(), "wb")
        self._file.write(struct.pack("<Q", len(self.header)) + self.header)
        self._next = 0
        return self

    def write(self, name: str, chunks: list[torch.Tensor]) -> None:
        """The tensor ``name`` as consecutive 1-D pieces, written without joining them."""
        assert self.order[self._next] == name, (name, self.order[self._next])
        for chunk in chunks:
            self._file.write(chunk.contiguous().view(torch.uint8).numpy())
        self._next += 1

    def __exit__(self, *exc):
        self._file.close()
        if exc[0] is None and self._next != len(self.order):
            exc = (RuntimeError, RuntimeError(f"{self.path}: {self._next} of {len(self.order)} tensors written"), None)
        self._ctx.__exit__(*exc)
        return False


def write_checkpoints(layout: dict, bf16_path: str, fp8_path: str) -> None:
    """The bf16 transformer (BFL names, "the 16-bit original") and Forge's fp8 single file,
    in one pass; each transformer tensor's fp8 copy is its bf16 values cast to float8_e4m3fn
    (an fp8 file made from that original)."""
    if os.path.isfile(bf16_path) and os.path.isfile(fp8_path):
        log(f"model files: present ({os.path.basename(bf16_path)}, {os.path.basename(fp8_path)})")
        return
    tensors = layout["tensors"]
    fp8_entries = [(k, torch.float8_e4m3fn if k.startswith(FP8_PARTS) else torch.float16, s) for k, s in tensors]
    bf16_entries = [(k[len(TRANSFORMER):], torch.bfloat16, s) for k, s in tensors if k.startswith(TRANSFORMER)]
    note = {"note": "random weights at FLUX.1-dev's shapes, written by tools/realhost/forge_setup.py"}
    started, values = time.perf_counter(), RandomValues()
    with SafetensorsWriter(bf16_path, bf16_entries, note) as bf16, SafetensorsWriter(fp8_path, fp8_entries, note) as fp8:
        for i, (name, dtype, shape) in enumerate(fp8_entries):
            if name.startswith(TRANSFORMER):
                bare = name[len(TRANSFORMER):]  # seeded by the BFL name: one tensor, two files
                bf16.write(bare, values.chunks(bare, shape, torch.bfloat16))
                fp8.write(name, values.chunks(bare, shape, dtype))
            else:
                fp8.write(name, values.chunks(name, shape, dtype))
            if i % 200 == 0:
                log(f"model files: {i}/{len(fp8_entries)} tensors, {time.perf_counter() - started:.0f} s")
    log(f"model files: {len(bf16_entries)} + {len(fp8_entries)} tensors in {time.perf_counter() - started:.0f} s")


# ------------------------------------------------------------------ 5. basis, ΔR, kohya export
def qrlora_files(p: dict) -> str:
    """The basis from the bf16 file (never from the fp8 one), a random ΔR on it and its kohya
    export, made with this project's code; the basis is put where the extension looks for it."""
    from qrlora.basis import load_basis

    py = sys.executable
    if not os.path.isfile(p["basis"]):
        run([py, "-m", "qrlora", "basis", p["bf16"], "--arch", "flux", "--rank", str(RANK),
             "--targets", *TARGETS, "--dtype", "fp32", "-o", p["basis"]])
    basis_id = load_basis(p["basis"]).basis_id
    os.makedirs(p["basis_dir"], exist_ok=True)
    shutil.copyfile(p["basis"], os.path.join(p["basis_dir"], basis_id + ".safetensors"))
    for folder in (p["qrlora_dir"], p["lora_dir"]):
        os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(p["delta"]):
        run([py, os.path.join(PROJECT, "examples", "make_example_delta_r.py"), p["basis"], p["delta"],
             "--scale", str(DELTA_SCALE)])
    if not os.path.isfile(p["lora"]):
        run([py, "-m", "qrlora", "export", p["delta"], "--to", "kohya", "--basis", p["basis"],
             "--dtype", "fp32", "-o", p["lora"]])
    log(f"qrlora files: basis {basis_id} in {p['basis_dir']}, {p['delta']}, {p['lora']}")
    return basis_id


def prepare_models(p: dict, py: str) -> None:
    os.makedirs(p["files"], exist_ok=True)
    layout = forge_layout(py, p["webui"], p["files"])
    write_checkpoints(layout, p["bf16"], p["fp8"])
    qrlora_files(p)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forge-git-dir", required=True, help=f"a git dir of Forge holding commit {COMMIT[:7]}")
    parser.add_argument("--work", required=True, help="folder for Forge, its venv and the model files (~45 GB)")
    parser.add_argument("--python", default="python3.11", help="interpreter for Forge's venv (3.10 or 3.11)")
    parser.add_argument("--skip-models", action="store_true", help="only the tree, the venv and the link")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work)
    p = paths(work)
    extract_forge(os.path.abspath(args.forge_git_dir), p["webui"])
    py = prepare_forge_venv(p["webui"], work, args.python)
    link_extension(p["webui"])
    if not args.skip_models:
        prepare_models(p, py)
    log("done")


if __name__ == "__main__":
    main()
