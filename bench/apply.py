"""Applying ``<qrlora:a:λ> <qrlora:b:μ>`` vs the two exported standard LoRAs, full-size SDXL.

A module tree holding only SDXL base's 722 UNet transformer linears (``sdxl-all``) at their
real shapes (``qrlora.tiny.real.real_shapes``), random fp16 weights, in the A1111 stand-in
(``tests/hosts``: the built-in Lora extension's load / backup / merge / restore semantics).
Two ΔR files at r = 64 on a basis that is already in memory ("warm"), and the same two files
exported with ``qrlora.export.to_kohya``:

- first apply: from the prompt to merged weights, files read from disk (page cache);
- re-apply after a λ change (files and networks already in memory).

Both go through the same merge path (``networks.network_apply_weights`` on every layer);
ratios are QR-LoRA / standard LoRA (lower is better). Ends with one JSON line.

    python bench/apply.py [--rank 64] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qrlora import archs, deltar  # noqa: E402
from qrlora.basis import Basis  # noqa: E402
from qrlora.checkpoint import save_atomic  # noqa: E402
from qrlora.export import to_kohya  # noqa: E402
from qrlora.tiny.real import real_shapes  # noqa: E402
from tests.hosts.harness import Host  # noqa: E402


def build_model(targets, device):
    """An A1111-style sd_model whose ``model.diffusion_model`` holds the targets' Linears
    (random fp16 weights: one random block per distinct shape, copied)."""
    sd = torch.nn.Module()
    sd.model = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    blocks = {}
    for t in targets:
        if t.shape not in blocks:
            blocks[t.shape] = (torch.rand(t.shape, generator=g) * 0.1 - 0.05).to(torch.float16)
        path = t.key[len("model."):-len(".weight")].split(".")
        parent = sd.model
        for name in path[:-1]:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
        layer = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(blocks[t.shape].to(device, copy=True), requires_grad=False)
        parent.add_module(path[-1], layer)
    sd.conditioner = torch.nn.Module()
    sd.conditioner.embedders = torch.nn.ModuleList()
    sd.is_sdxl = True
    sd.sd_checkpoint_info = type("Info", (), {"filename": None})()
    return sd


HOST_PATH = ("A1111 path: the built-in Lora extension's stand-in (tests/hosts/a1111_lora), QR-LoRA through "
             "extension/a1111.py; merge on the first forward after activation")


def random_basis(targets, rank):
    """Orthonormal Q per layer (one QR per distinct height, copied): the bench needs a basis
    that is already there, not the canonical one of these random weights."""
    g = torch.Generator().manual_seed(1)
    per_height = {}
    q = {}
    for t in targets:
        if t.shape[0] not in per_height:
            per_height[t.shape[0]] = torch.linalg.qr(torch.randn(t.shape[0], rank, generator=g))[0].contiguous()
        q[t.name] = per_height[t.shape[0]].clone()
    return Basis("sdxl", rank, list(targets), q, f"sdxl-r{rank}-bench00000000000")


def write_files(basis, folder, lora_folder):
    paths = {}
    for i, name in enumerate(("subject", "style")):
        g = torch.Generator().manual_seed(10 + i)
        dr = {t.name: torch.randn(basis.rank, t.shape[1], generator=g) * 0.01 for t in basis.targets}
        d = deltar.from_basis(basis, dr, alpha=basis.rank / 2, mask="triu")
        del dr
        deltar.save(d, os.path.join(folder, f"{name}.safetensors"), output_name=name)
        tensors, meta = to_kohya(d, basis.q)  # the standard export: fp16, up = Q, down = ΔR, alpha = s·r
        save_atomic(tensors, os.path.join(lora_folder, f"{name}_lora.safetensors"), meta)
        del d, tensors
        gc.collect()
        paths[name] = os.path.join(folder, f"{name}.safetensors")
    return paths


def timed(host, p, sync):
    """(activation, merge) seconds: what ``extra_networks.activate`` costs, then what the
    layers' first forward costs (``network_apply_weights`` on every layer)."""
    sync()
    start = time.perf_counter()
    host.extra_networks.activate(p, p.extra_network_data)
    sync()
    activated = time.perf_counter()
    for layer in host.layers:
        host.networks.network_apply_weights(layer)
    sync()
    errors = dict(host.networks.extra_network_lora.errors)
    assert not errors, errors
    return activated - start, time.perf_counter() - activated


def warm_page_cache(*folders):
    """Read every file once, so neither side's first apply pays a cold disk read."""
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(dirpath, name), "rb") as f:
                    while f.read(1 << 24):
                        pass


def warm_backups(host):
    """Lora copies every layer to its CPU backup on the first change; do it before timing."""
    import network

    host.networks.loaded_networks[:] = [network.Network("warm-up", None)]
    for layer in host.layers:
        host.networks.network_apply_weights(layer)
    host.networks.loaded_networks.clear()
    for layer in host.layers:
        host.networks.network_apply_weights(layer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="λ changes timed (the best is kept)")
    ap.add_argument("--device", default="cpu", help="where the weights live (cuda: merges on the GPU)")
    ap.add_argument("--layers", type=int, default=0, help="only the first N targets (quick runs)")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    a = archs.get("sdxl")
    targets = a.select(a.linear_targets(real_shapes("sdxl")), "sdxl-all")
    if args.layers:
        targets = targets[: args.layers]
    tmp = tempfile.mkdtemp(prefix="qrlora-bench-apply-")
    qr_dir, lora_dir = os.path.join(tmp, "QRLoRA"), os.path.join(tmp, "Lora")
    os.makedirs(qr_dir)
    os.makedirs(lora_dir)
    t0 = time.perf_counter()
    basis = random_basis(targets, args.rank)
    write_files(basis, qr_dir, lora_dir)
    sd = build_model(targets, device)
    print(f"{len(targets)} layers, {sum(t.shape[0] * t.shape[1] for t in targets) / 1e9:.2f} B parameters (fp16), "
          f"rank {args.rank}; setup {time.perf_counter() - t0:.0f} s", flush=True)

    host = Host("a1111", tmp, qr_dir, lora_dir=lora_dir, basis_dir=os.path.join(tmp, "basis"))
    from modules import extra_networks

    host.load_model(sd)
    host.layers = [m for m in sd.modules() if isinstance(m, torch.nn.Linear)]
    host.engine.resolver.remember(basis.basis_id, basis.q)  # warm basis: already computed / cached
    P = type("P", (), {})

    def prompt(text):
        p = P()
        p.sd_model, p.extra_generation_params, p.scripts, p.is_hr_pass = sd, {}, None, False
        p.comment = lambda text: print("comment:", text)
        p.prompts, p.extra_network_data = extra_networks.parse_prompts([text])
        return p

    warm_backups(host)
    warm_page_cache(qr_dir, lora_dir)  # both sides' files read once: both first applies hit a hot page cache

    def best(runs):
        return min(runs, key=sum)

    # standard LoRA: first apply (files read), then λ changes (networks in memory)
    lora_first = timed(host, prompt("<lora:subject_lora:1.0> <lora:style_lora:0.8>"), sync)
    lora_again = best([timed(host, prompt(f"<lora:subject_lora:{0.9 - 0.1 * i}> <lora:style_lora:0.8>"), sync)
                       for i in range(args.repeats)])
    timed(host, prompt("nothing"), sync)  # restore; Lora drops its networks from memory (limit 0)
    gc.collect()
    qr_first = timed(host, prompt("<qrlora:subject:1.0> <qrlora:style:0.8>"), sync)
    qr_again = best([timed(host, prompt(f"<qrlora:subject:{0.9 - 0.1 * i}> <qrlora:style:0.8>"), sync)
                     for i in range(args.repeats)])
    assert host.engine.resolver.computations == 0
    timed(host, prompt("nothing"), sync)
    host.close()
    shutil.rmtree(tmp, ignore_errors=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for label, lo, qr in (("first apply", lora_first, qr_first), ("re-apply after λ", lora_again, qr_again)):
        print(f"{label:18s} QR-LoRA {sum(qr):6.2f} s (activate {qr[0]:5.2f} + merge {qr[1]:5.2f})   "
              f"standard LoRA {sum(lo):6.2f} s (activate {lo[0]:5.2f} + merge {lo[1]:5.2f})   "
              f"ratio {sum(qr) / sum(lo):.2f}")
    print(f"peak memory {peak_gb:.1f} GB; measured on {HOST_PATH}, page cache hot for both sides")
    qr_first, lora_first, qr_again, lora_again = sum(qr_first), sum(lora_first), sum(qr_again), sum(lora_again)
    first, again = qr_first / lora_first, qr_again / lora_again
    print(json.dumps({
        "bench": "apply", "layers": len(targets), "rank": args.rank, "device": str(device),
        "weights_dtype": "float16", "threads": torch.get_num_threads(),
        "qrlora_first_s": round(qr_first, 3), "lora_first_s": round(lora_first, 3), "first_ratio": round(first, 3),
        "qrlora_reapply_s": round(qr_again, 3), "lora_reapply_s": round(lora_again, 3),
        "reapply_ratio": round(again, 3), "goal": 1.1, "peak_rss_gb": round(peak_gb, 2),
        "host_path": HOST_PATH, "page_cache": "hot (both sides' files read before timing)",
        "basis": "in memory (as after its one-time computation)",
    }))


if __name__ == "__main__":
    main()
