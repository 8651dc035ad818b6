"""Training-step cost of QR-LoRA vs a standard LoRA (ours) vs PEFT's LoRA, same model, same
rank and targets, CPU fp32: SDXL UNets (kohya's SDXL set) and FLUX (``flux``: a diffusers
FluxTransformer2DModel at FLUX.1-dev's real widths, 3072 wide with 24 heads of 128, 4096-wide
T5 context, with 1 double and 1 single block instead of 19 and 38; the official QR-LoRA targets).

Each (model, variant) runs in its own process, so the peak resident memory it reports is its
own. Prints ms/step, peak RSS and optimizer-state bytes, the ratios against both LoRAs
measured in this run, and ends with one JSON line.

    python bench/train_step.py [--models tiny,medium,flux] [--steps 6] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("qrlora", "lora", "peft")


def unet_config(model: str) -> dict:
    from qrlora.tiny.real import SDXL_BASE_UNET
    from qrlora.tiny.sdxl import UNET_CONFIG

    if model == "tiny":
        return dict(UNET_CONFIG)
    if model == "medium":  # SDXL's structure at a quarter of its width (depths 1/2/10 kept)
        cfg = dict(SDXL_BASE_UNET)
        cfg.update(block_out_channels=[80, 160, 320], cross_attention_dim=512, attention_head_dim=[2, 4, 8],
                   addition_time_embed_dim=64, projection_class_embeddings_input_dim=6 * 64 + 128, norm_num_groups=16)
        return cfg
    raise ValueError(model)


def inputs(cfg: dict, batch: int, size: int, generator):
    import torch

    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=generator),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 77, cfg["cross_attention_dim"], generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=generator),
                           "time_ids": torch.tensor([[size * 8.0, size * 8, 0, 0, size * 8, size * 8]] * batch)},
    )


# FLUX.1-dev's widths (qrlora.tiny.real), at a depth of 1 double and 1 single block.
FLUX_REDUCED = dict(num_layers=1, num_single_layers=1)
FLUX_TEXT_TOKENS = 32


def flux_inputs(cfg: dict, size: int, generator):
    import torch

    image_tokens = size * size
    return dict(
        hidden_states=torch.randn(1, image_tokens, cfg["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(1, FLUX_TEXT_TOKENS, cfg["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=generator),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3),
    )


def build(model: str, size: int, generator):
    """(model, its family's name, target preset, component prefix, forward(model) -> output,
    the output's shape)."""
    if model == "flux":
        from diffusers import FluxTransformer2DModel

        from qrlora.tiny.real import FLUX_DEV_TRANSFORMER

        cfg = {**FLUX_DEV_TRANSFORMER, **FLUX_REDUCED}
        net = FluxTransformer2DModel(**cfg)
        batch = flux_inputs(cfg, size, generator)
        return net, "flux", "flux-official", "transformer.", lambda m: m(**batch).sample, (1, size * size, cfg["in_channels"])
    from diffusers import UNet2DConditionModel

    cfg = unet_config(model)
    batch = inputs(cfg, 1, size, generator)
    return (UNet2DConditionModel(**cfg), "sdxl", "sdxl-all", "unet.", lambda m: m(**batch).sample, (1, 4, size, size))


def run_one(model: str, variant: str, steps: int, rank: int, size: int) -> dict:
    import torch

    from qrlora import archs
    from qrlora.basis import compute_basis
    from trainer.network import AdapterNetwork

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    unet, family, preset_name, component, forward, out_shape = build(model, size, g)
    unet.requires_grad_(False)
    unet.train()
    arch = archs.get(family)
    preset = arch.presets[preset_name]
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
             and any(archs._match(p, component + n) for p in preset)]
    modules = {n: unet.get_submodule(n) for n in names}
    if variant == "qrlora":
        from qrlora.archs import Target

        targets = [Target(n, "", None, tuple(m.weight.shape)) for n, m in modules.items()]
        q, _ = compute_basis(lambda t: modules[t.name].weight.detach(), targets, family, rank, device="cpu")
        net = AdapterNetwork.qrlora(modules, q, alpha=rank, mask="triu")
        net.apply()
        params = net.trainable_parameters()
    elif variant == "lora":
        net = AdapterNetwork.lora(modules, rank, alpha=rank)
        net.apply()
        params = net.trainable_parameters()
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights="gaussian"))
        params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn(*out_shape, generator=g)
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        out = forward(unet)
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - started)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    return {
        "model": model, "variant": variant, "layers": len(names), "rank": rank,
        "trainable": sum(p.numel() for p in params),
        "ms_per_step": 1000 * statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_state_bytes": state_bytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,medium,flux")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = {"tiny": 32, "medium": 32, "flux": 8}  # flux: an 8x8 packed latent (a 128 px image): 64 image tokens
    if args.one:
        model, variant = args.one
        print(json.dumps(run_one(model, variant, args.steps, min(args.rank, 4 if model == "tiny" else args.rank),
                                 sizes[model])))
        return
    results = {}
    for model in args.models.split(","):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--one", model, variant, "--steps", str(args.steps),
                                  "--rank", str(args.rank)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(model, variant)] = r
            print(f"{model:>6} {variant:>6} r={r['rank']}: {r['ms_per_step']:8.1f} ms/step  peak {r['peak_rss_mb']:7.0f} MB  "
                  f"trainable {r['trainable']:>10,}  optimizer state {r['optimizer_state_bytes'] / 1e6:8.2f} MB")
    summary = {"bench": "train_step", "rank_requested": args.rank, "steps": args.steps,
               "warm_up_steps": 2}  # every variant: two untimed steps, then the median of the rest
    for model in args.models.split(","):
        q, lo, pe = (results[(model, v)] for v in VARIANTS)
        ratios = {
            "step_vs_lora": q["ms_per_step"] / lo["ms_per_step"],
            "step_vs_peft": q["ms_per_step"] / pe["ms_per_step"],
            "peak_vs_lora": q["peak_rss_mb"] / lo["peak_rss_mb"],
            "peak_vs_peft": q["peak_rss_mb"] / pe["peak_rss_mb"],
            "optimizer_state_vs_lora": q["optimizer_state_bytes"] / lo["optimizer_state_bytes"],
        }
        print(f"{model} (r = {q['rank']}): QR-LoRA step {ratios['step_vs_lora']:.2f}x our LoRA, {ratios['step_vs_peft']:.2f}x PEFT; "
              f"peak memory {ratios['peak_vs_lora']:.2f}x / {ratios['peak_vs_peft']:.2f}x; "
              f"optimizer state {ratios['optimizer_state_vs_lora']:.3f}x")
        summary[model] = {"rank": q["rank"],  # the rank really run (the tiny model is capped at 4)
                          **{k: round(v, 3) for k, v in ratios.items()},
                          **{f"{v}_ms": round(results[(model, v)]["ms_per_step"], 1) for v in VARIANTS}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
