"""GPU check: bf16 training steps at real widths, their measured peak memory against the
``--dry-run`` estimate, and the basis computed on the GPU. Ends with one JSON line.

    python bench/gpu_check.py [--resolution 1024] [--rank 16] [--steps 3] [--flux-blocks 19,38] [--dry]

Cases, each a QR-LoRA on the family's default targets, AdamW, bf16 autocast, gradient
checkpointing, batch 1 at ``--resolution``², random weights:

- ``sdxl``: SDXL base 1.0's UNet at full depth, its two text encoders resident (as a run
  without cached text-encoder outputs keeps them);
- ``flux`` and ``flux_fp8``: FLUX.1-dev's transformer at real width with ``--flux-blocks``
  double,single blocks (19,38 is the full model), text-encoder outputs cached (the encoders
  are not built), once in bf16 and once with ``fp8_base`` (Linear weights float8_e4m3fn,
  upcast per call by the FLUX loader's own ``Fp8Linear``).

Every case also holds its VAE, as a training run does. The model is built on the GPU, one
step warms up, then ``--steps`` steps are timed; the peak is ``torch.cuda.max_memory_allocated``
over the timed steps (weights included), compared with ``trainer.memory.estimate`` for the
same shapes and settings (which leaves out the CUDA context and allocator slack, as
max_memory_allocated does).

Basis: ``qrlora.basis.compute_basis`` on the GPU for one random weight of each distinct
shape of FLUX.1-dev's 342 official targets at ``--rank``, against the official full SVD +
rank-r core + full QR on the same GPU, both warmed up, extrapolated by the count of each shape.

``--dry`` builds every case on the meta device and prints the estimates without a GPU (the
tests run it); without CUDA and without ``--dry`` the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trainer import memory  # noqa: E402

GIB = 2**30


def case_shapes(name: str, flux_blocks: tuple[int, int]) -> memory.ModelShapes:
    from qrlora.tiny import real
    from trainer.families.flux_load import FLUX_AE

    if name == "sdxl":
        return memory.shapes_for("sdxl-base")
    double, single = flux_blocks
    config = dict(real.FLUX_DEV_TRANSFORMER, num_layers=double, num_single_layers=single)
    return memory.flux_shapes(f"flux1-dev ({double}+{single} blocks)", config, FLUX_AE, real.CLIP_L,
                              memory.T5_XXL, None)


def case_settings(name: str, args) -> memory.RunSettings:
    return memory.RunSettings(
        model=name, mixed_precision="bf16", fp8_base=name == "flux_fp8", rank=args.rank, optimizer="adamw",
        batch_size=1, bucket=(args.resolution, args.resolution), gradient_checkpointing=True,
        text_encoders="resident" if name == "sdxl" else "freed")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # Built straight in bf16: FLUX.1-dev in float32 would need 48 GB before any cast.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(s: memory.RunSettings, shapes: memory.ModelShapes, device: torch.device):
    """(denoiser, kept modules, network, optimizer) of one case on ``device``, as the trainer
    holds them: frozen bf16 weights (fp8 Linear weights with fp8_base), adapters in float32."""
    from trainer.optim import make_optimizer

    with torch.device(device), default_dtype(torch.bfloat16):
        denoiser = shapes.denoiser()
        vae = shapes.vae()
    with torch.device(device if s.text_encoders == "resident" else "meta"), default_dtype(torch.bfloat16):
        encoders = [b() for b in shapes.text_encoders]  # on meta they only name the targets
    for m in (denoiser, vae, *encoders):
        m.requires_grad_(False)
    if s.fp8_base:
        memory.store_fp8(denoiser)
    names, modules = memory.target_modules(s, shapes, denoiser, encoders)
    with torch.device(device):
        q = {n: torch.linalg.qr(torch.randn(m.out_features, s.rank))[0] if device.type != "meta"
             else torch.empty(m.out_features, s.rank) for n, m in modules.items()}
        network = memory.adapter_network(s, modules, q)
    network.to(device)
    network.apply()
    denoiser.train()
    denoiser.enable_gradient_checkpointing()
    optimizer = make_optimizer("adamw", [{"params": network.trainable_parameters()}], 1e-4)
    kept = [vae, *(encoders if s.text_encoders == "resident" else [])]
    return denoiser, kept, network, optimizer


def train_step(s, shapes, denoiser, optimizer, device) -> float:
    with torch.device(device), torch.autocast(device.type, dtype=torch.bfloat16):
        pred, target = memory.denoiser_forward(s, shapes, denoiser, torch.bfloat16)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def run_case(name: str, args, device: torch.device) -> dict:
    s, shapes = case_settings(name, args), case_shapes("sdxl" if name == "sdxl" else "flux", args.flux_blocks)
    est = memory.estimate(s, shapes)
    out = {"model": shapes.name, "estimate_gib": round(est.total / GIB, 3), "targets": est.targets,
           "estimate_rows_mib": {r.component: round(r.bytes / 2**20, 1) for r in est.rows}}
    if device.type == "meta":
        build(s, shapes, device)  # the GPU path's setup, without a GPU
        return out
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build(s, shapes, device)
    denoiser, _, _, optimizer = model
    train_step(s, shapes, denoiser, optimizer, device)  # warm-up: kernels chosen, optimizer state made
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(s, shapes, denoiser, optimizer, device)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() - base
    out.update(measured_peak_gib=round(peak / GIB, 3), measured_over_estimate=round(peak / est.total, 3),
               step_s=round(step_s, 3))
    del model, denoiser, optimizer
    torch.cuda.empty_cache()
    return out


def basis_timing(rank: int, device: torch.device) -> dict:
    """Ours vs the official basis on the GPU, FLUX.1-dev's official targets, extrapolated."""
    from qrlora import archs
    from qrlora.basis import compute_basis
    from qrlora.tiny.real import real_shapes
    from tests.official_reference import official_qr

    flux = archs.get("flux")
    targets = flux.select(flux.linear_targets(real_shapes("flux")), "flux-official")
    counts = Counter(tuple(t.shape) for t in targets)
    out = {"rank": rank, "targets": len(targets), "shapes": {f"{o}x{i}": n for (o, i), n in counts.items()}}
    if device.type == "meta":
        return out
    gen = torch.Generator(device).manual_seed(0)
    ours = official = 0.0
    for shape, n in counts.items():
        sample = [t for t in targets if tuple(t.shape) == shape][:1]
        w = torch.randn(*shape, generator=gen, device=device) / shape[1] ** 0.5

        def timed(fn):
            fn()  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        ours += n * timed(lambda: compute_basis(lambda t: w, sample, "flux", rank, device=device))
        official += n * timed(lambda: official_qr(w, rank))
    out.update(ours_s=round(ours, 2), official_s=round(official, 2), speedup=round(official / ours, 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--flux-blocks", default="19,38", help="double,single blocks of the FLUX case (19,38: full)")
    p.add_argument("--cases", default="sdxl,flux,flux_fp8")
    p.add_argument("--dry", action="store_true", help="build on the meta device and print the estimates only")
    args = p.parse_args(argv)
    args.flux_blocks = tuple(int(v) for v in args.flux_blocks.split(","))
    if args.dry:
        device = torch.device("meta")
    elif not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU and none is available here; run it on a GPU machine, or use --dry "
              "to check the setup and print the estimates without one", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "meta (--dry)",
              "torch": torch.__version__, "resolution": args.resolution, "rank": args.rank}
    for name in args.cases.split(","):
        report[name] = run_case(name, args, device)
        print(f"{name}: {report[name]}", file=sys.stderr, flush=True)
    report["basis_flux_official"] = basis_timing(64, device)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
