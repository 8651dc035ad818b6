"""Sample images during training, from kohya prompt files or inline prompt lines."""

from __future__ import annotations

import os

import torch

from trainer.prompts import load_prompts, parse_prompt_text


def prompts_of(cfg) -> list:
    p = cfg.sampling.prompts
    if p is None:
        return []
    if isinstance(p, str) and os.path.isfile(p):
        return load_prompts(p)
    lines = [p] if isinstance(p, str) else list(p)
    return parse_prompt_text("\n".join(lines))


def sample_images(trainer, tag: str) -> list[str]:
    """One PNG per prompt into ``output_dir/sample/``, named like kohya's
    (``NAME_TAG_INDEX_SEED.png``); returns the paths."""
    cfg, s = trainer.cfg, trainer.cfg.sampling
    folder = os.path.join(cfg.training.output_dir, "sample")
    os.makedirs(folder, exist_ok=True)
    width, height = trainer.family.default_size(trainer.models)
    first = trainer.plan.datasets[0].buckets.resolution if trainer.plan.datasets else (width, height)
    paths = []
    for prompt in prompts_of(cfg):
        if prompt.unknown:
            trainer.say(f"warning: sample prompt {prompt.index + 1}: options not understood: {', '.join(prompt.unknown)}")
        defaults = dict(negative_prompt="", width=s.width or first[0], height=s.height or first[1],
                        seed=cfg.training.seed + prompt.index, steps=s.steps, scale=s.guidance_scale,
                        sampler=s.sample_sampler)
        defaults.update(trainer.family.sample_defaults(trainer.models))  # FLUX: no CFG unless --l
        p = prompt.with_defaults(**defaults)
        with torch.no_grad():
            image = trainer.family.sample(trainer.models, p.prompt, p.negative_prompt, p.width, p.height, p.steps,
                                          p.scale, p.seed, p.sampler, extra=p.extra)
        path = os.path.join(folder, f"{trainer.output_name()}_{tag}_{prompt.index:02d}_{p.seed}.png")
        image.save(path)
        paths.append(path)
    return paths
