"""Many lab images at once: the SDXL family's sampler (``SDXLFamily.sample``) for a batch.

Same scheduler, conditioning, micro-conditioning and decoding as ``family.sample``; each
image has its own seeded generator (initial noise and, for ancestral samplers, the noise of
every step), so image i equals ``family.sample(..., seed=seeds[i])`` (tested), only faster.
"""

from __future__ import annotations

from typing import Sequence

import torch


def sample_batch(family, models, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20,
                 guidance_scale: float = 1.0, sampler: str = "euler_a", negative_prompt: str = "",
                 batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) float images in [-1, 1] at the model's default size."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_batch: {len(prompts)} prompts but {len(seeds)} seeds")
    out = [
        _one_batch(family, models, prompts[i : i + batch_size], seeds[i : i + batch_size], steps, guidance_scale,
                   sampler, negative_prompt)
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def _one_batch(family, models, prompts, seeds, steps, guidance_scale, sampler, negative_prompt):
    import diffusers

    from trainer.families.sdxl import SAMPLERS

    cls_name, extra = SAMPLERS[sampler]
    scheduler = getattr(diffusers, cls_name).from_config(models.noise_scheduler.config, **extra)
    unet, vae = models.denoiser, models.vae
    device, dtype = unet.device, unet.dtype
    factor = family.vae_scale_factor(models)
    width, height = family.default_size(models)
    b = len(prompts)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    cfg = guidance_scale > 1.0
    texts = ([negative_prompt or ""] * b if cfg else []) + list(prompts)
    conds = family.encode_prompts(models, texts)
    hidden, pooled = conds["encoder_hidden_states"].to(device, dtype), conds["text_embeds"].to(device, dtype)
    ids = torch.tensor([[height, width, 0, 0, height, width]] * len(texts), device=device, dtype=dtype)

    scheduler.set_timesteps(steps, device=device)
    shape = (1, unet.config.in_channels, height // factor, width // factor)
    latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * (2 if cfg else 1)), t)
            pred = unet(inp.to(dtype), t, encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(pred, t, latents, generator=generators).prev_sample
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return images.float().clamp(-1, 1)
