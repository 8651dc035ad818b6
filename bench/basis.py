"""Basis computation at r = 64 on full-size shapes: SDXL's 722 transformer linears, or with
``--arch flux`` the 342 official QR-LoRA targets of FLUX.1-dev.

Ours (qrlora.qr.canonical_basis through qrlora.basis.compute_basis, batched per shape)
against the official way (full fp32 SVD, rank-r core, full reduced QR), both timed in this
run on the same random weights of every distinct shape and extrapolated by the number of
layers of that shape; Q agreement after sign alignment, between the two and against a
float64 computation (random weights have nearly equal σ_r and σ_r+1, the hardest case for
any float32 method); and the time of a basis-cache hit, with the page cache hot and cold.
Both methods are warmed up the same way (one untimed layer of each shape) before timing.
Ends with one JSON line.

    python bench/basis.py [--arch sdxl|flux] [--samples 1] [--rank 64] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qrlora import archs  # noqa: E402
from qrlora.archs import Target  # noqa: E402
from qrlora.basis import Basis, BasisCache, compute_basis  # noqa: E402
from qrlora.qr import canonical_basis  # noqa: E402
from qrlora.tiny.real import real_shapes  # noqa: E402
from tests.official_reference import official_qr  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["sdxl", "flux"], default="sdxl")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--samples", type=int, default=1, help="layers of each shape timed per method (default 1: a short run)")
    p.add_argument("--full", action="store_true", help="also run ours on every layer (minutes on 2 cores)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    arch = archs.get(args.arch)
    preset = {"sdxl": "sdxl-all", "flux": "flux-official"}[args.arch]
    shapes = real_shapes(args.arch)
    targets = arch.select(arch.linear_targets(shapes), preset)
    counts = Counter(t.shape for t in targets)
    print(f"{len(targets)} layers, {len(counts)} shapes, rank {args.rank}, {torch.get_num_threads()} threads, device {args.device}")
    gen = torch.Generator().manual_seed(0)

    ours_total = official_total = 0.0
    worst = worst_ours = worst_official = 0.0
    for shape, count in sorted(counts.items()):
        sample = [t for t in targets if t.shape == shape][: args.samples]
        weights = {t.name: torch.randn(*shape, generator=gen) / shape[1] ** 0.5 for t in sample}
        # warm both sides the same way: one untimed layer of this shape each
        compute_basis(lambda t: weights[t.name], sample[:1], args.arch, args.rank, device=args.device)
        official_qr(weights[sample[0].name], args.rank)
        started = time.perf_counter()
        q, _ = compute_basis(lambda t: weights[t.name], sample, args.arch, args.rank, device=args.device)
        ours = (time.perf_counter() - started) / len(sample)
        started = time.perf_counter()
        q_official = {t.name: official_qr(weights[t.name], args.rank)[0] for t in sample}
        official = (time.perf_counter() - started) / len(sample)
        for t in sample:
            truth = canonical_basis(weights[t.name].double(), args.rank, torch.float64)
            signs = torch.sign(torch.diagonal(truth.T @ q_official[t.name].double()))
            official_q = q_official[t.name].double() * signs
            worst = max(worst, float((official_q - q[t.name]).abs().max()))
            worst_ours = max(worst_ours, float((q[t.name].double() - truth).abs().max()))
            worst_official = max(worst_official, float((official_q - truth).abs().max()))
        ours_total += ours * count
        official_total += official * count
        print(f"  {shape[0]:>5}x{shape[1]:<5} x{count:<4} ours {ours * 1e3:8.1f} ms  official {official * 1e3:8.1f} ms  ({official / ours:.1f}x)")

    # Trained layers have decaying spectra (a clear gap after σ_r): agreement there.
    trained_worst = 0.0
    for shape in sorted(counts):
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
        w = (u * torch.arange(1, k + 1, dtype=torch.float32) ** -0.6) @ v.T
        t = Target("trained-like", "", None, shape)
        q, _ = compute_basis(lambda _t: w, [t], args.arch, args.rank, device=args.device)
        q_official = official_qr(w, args.rank)[0]
        signs = torch.sign(torch.diagonal(q["trained-like"].T @ q_official))
        trained_worst = max(trained_worst, float((q_official - q["trained-like"] * signs).abs().max()))

    full_seconds = None
    if args.full:
        weights = {}
        started = time.perf_counter()
        compute_basis(lambda t: weights.setdefault(t.shape, torch.randn(*t.shape, generator=gen) / t.shape[1] ** 0.5),
                      targets, args.arch, args.rank, device=args.device)
        full_seconds = time.perf_counter() - started

    # A cache hit: a stored 722-layer basis, found from a checkpoint with SDXL's real header
    # (a sparse file: the lookup reads the header and a few bytes of every target weight).
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, {"sdxl": "sd_xl_base_1.0.safetensors", "flux": "flux1-dev.safetensors"}[args.arch])
        sparse_checkpoint(ckpt, shapes)
        q_all = {t.name: torch.randn(t.shape[0], args.rank, generator=gen) for t in targets}
        cache = BasisCache(os.path.join(tmp, "cache"))
        bench_id = f"{args.arch}-r{args.rank}-benchcache000000"
        cache.store(Basis(args.arch, args.rank, targets, q_all, bench_id, preset), ckpt, preset)
        basis_path = cache.path_for(bench_id)
        basis_mb = os.path.getsize(basis_path) / 1e6
        cache_hit = {}
        for page_cache in ("cold", "hot"):
            if page_cache == "cold":
                cold = all(drop_page_cache(f) for f in (basis_path, ckpt))
                if not cold:
                    page_cache = "hot (could not drop the page cache)"
            started = time.perf_counter()
            hit = cache.lookup(ckpt, args.rank, preset)
            cache_hit[page_cache] = time.perf_counter() - started
            assert hit is not None and len(hit.targets) == len(targets)

    speedup = official_total / ours_total
    print(f"{len(targets)} layers: ours {ours_total:.1f} s, official {official_total:.1f} s (both extrapolated from"
          f" {args.samples} timed layer(s) per shape) -> {speedup:.2f}x faster")
    if full_seconds is not None:
        print(f"ours, all {len(targets)} layers for real: {full_seconds:.1f} s")
    print(f"Q agreement after sign alignment: max |Q_ours - Q_official| = {worst:.2e};"
          f" against float64: ours {worst_ours:.2e}, official {worst_official:.2e}")
    print(f"Q agreement on trained-like spectra (σ_k ∝ k^-0.6): max |Q_ours - Q_official| = {trained_worst:.2e}")
    print("cache hit (lookup by checkpoint contents, sketch check included) for a "
          f"{basis_mb:.0f} MB basis file: " + ", ".join(f"{v:.3f} s with the page cache {k}" for k, v in cache_hit.items()))
    print(json.dumps({
        "bench": "basis", "arch": args.arch, "layers": len(targets), "samples_per_shape": args.samples, "rank": args.rank, "threads": torch.get_num_threads(),
        "device": args.device, "ours_s": round(ours_total, 2), "official_s": round(official_total, 2),
        "speedup": round(speedup, 2), "ours_full_s": None if full_seconds is None else round(full_seconds, 2),
        "q_max_abs_diff": worst, "q_ours_vs_fp64": worst_ours, "q_official_vs_fp64": worst_official,
        "q_max_abs_diff_trained_like": trained_worst, "cache_hit_s": {k: round(v, 3) for k, v in cache_hit.items()}, "basis_file_mb": round(basis_mb, 1),
    }))


def sparse_checkpoint(path: str, shapes: dict) -> None:
    """A safetensors file with the given fp16 tensors whose data is a hole (reads as zeros,
    takes no disk space): a full-size header without writing gigabytes."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def drop_page_cache(path: str) -> bool:
    """Ask the kernel to forget a file's cached pages (Linux; no root needed for clean pages)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
