"""Tiny, deterministic, random-weight checkpoints in the layouts real users have.

Used by the tests, the demo and bug reports (``qrlora make-tiny``). Building them needs
diffusers and transformers (the ``trainer`` extra); nothing here is imported by the WebUI
side, and nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class TinyModel:
    arch: str
    checkpoint: str  # the main single-file checkpoint (SGM for SDXL, BFL transformer for FLUX)
    config_dir: str  # diffusers configs, one sub-folder per component (unet/, vae/, text_encoder/, ...)
    extra_files: dict[str, str] = field(default_factory=dict)  # FLUX: {"vae": ..., "clip_l": ..., "t5": ...}


def make_tiny(arch: str, out_dir: str, seed: int = 0) -> TinyModel:
    """Write the tiny checkpoint of ``arch`` into ``out_dir``; same seed, same bytes."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"make-tiny needs diffusers and transformers ({e.name} is missing): pip install 'qrlora[trainer]'"
        ) from None
    os.makedirs(out_dir, exist_ok=True)
    if arch == "sdxl":
        from .sdxl import make
    elif arch == "flux":
        from .flux import make
    else:
        raise ValueError(f"make-tiny: unknown architecture {arch!r} (sdxl or flux)")
    return make(out_dir, seed=seed)
