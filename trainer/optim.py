"""Optimizers and learning-rate schedules by kohya's names."""

from __future__ import annotations

import math

import torch

from qrlora.errors import UserError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def make_optimizer(name: str, param_groups: list[dict], lr: float, args: dict | None = None):
    """AdamW and SGD from torch; AdamW8bit (bitsandbytes) and Prodigy (prodigyopt) when installed."""
    args = dict(args or {})
    key = name.lower()
    if key == "adamw":
        args.setdefault("weight_decay", 0.01)
        return torch.optim.AdamW(param_groups, lr=lr, **args)
    if key == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, **args)
    if key == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("training.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr, **args)
    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("training.optimizer = 'prodigy' needs prodigyopt: pip install prodigyopt") from None
        return Prodigy(param_groups, lr=lr, **args)
    raise UserError(f"training.optimizer: unknown optimizer {name!r}; choose adamw, sgd, adamw8bit or prodigy")


def warmup_steps(value: float, total_steps: int) -> int:
    """kohya: a number < 1 is a fraction of the total steps."""
    return int(value * total_steps) if 0 < value < 1 else int(value)


def make_scheduler(name: str, optimizer, total_steps: int, warmup: int = 0, num_cycles: int = 1):
    """A LambdaLR (its state dict holds only numbers, so resume needs no pickled functions)."""
    if name not in SCHEDULERS:
        raise UserError(f"training.lr_scheduler: unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup and name != "constant":
            return (step + 1) / warmup
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if progress >= 1.0:  # cosine_with_restarts
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
