"""Many lab images at once, in batches: ``SDXLFamily.sample_images``, the code behind
``family.sample``, with one seeded generator per image, so image i equals
``family.sample(..., seed=seeds[i])`` (tested), only faster.
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
    width, height = family.default_size(models)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return family.sample_images(models, prompts, generators, width, height, steps, guidance_scale, sampler,
                                negative_prompt)
