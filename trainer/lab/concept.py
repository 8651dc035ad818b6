"""A concept for an adapter to learn on the lab base: one label the base never saw (a pattern
such as ``striped``, or a shape such as ``star``) shown on the base world's other labels.

The label's own word is the trigger: ``a red striped circle on white`` is the world's caption
of such a scene, and the base was trained on solid shapes only, so ``striped`` means nothing
to it. ``write_dataset`` writes a kohya image folder (PNG + ``.txt`` caption) and a prompt file
of other scenes with the same label; after ``python -m trainer`` has sampled those prompts at
the first and the last step (``sample_at_first``), ``score_samples`` reads both sets of images
and says how many show the concept, and how many keep the prompt's colour and background.
"""

from __future__ import annotations

import io
import os
import re

import torch

from qrlora.checkpoint import write_bytes_atomic
from qrlora.errors import UserError

from . import score, world
from .pretrain import BASE_VOCABULARY

KINDS = ("pattern", "shape")
# the trainer's sample names: NAME_TAG_INDEX_SEED.png, TAG "first" (sample_at_first) or the step
SAMPLE_NAME = re.compile(r"^(?P<name>.+)_(?P<tag>first|\d{6})_(?P<index>\d+)_(?P<seed>\d+)\.png$")


def vocabulary(kind: str, value: str) -> world.Vocabulary:
    """The base world with ``kind`` replaced by the one new ``value``."""
    if kind not in KINDS:
        raise UserError(f"concept kind {kind!r}: expected one of {', '.join(KINDS)}")
    known = world.PATTERNS if kind == "pattern" else world.SHAPES
    base = BASE_VOCABULARY.patterns if kind == "pattern" else BASE_VOCABULARY.shapes
    if value not in known or value in base:
        new = [v for v in known if v not in base]
        raise UserError(f"concept {kind} {value!r}: expected one the base never saw: {', '.join(new)}")
    return world.Vocabulary(shapes=(value,) if kind == "shape" else BASE_VOCABULARY.shapes,
                            patterns=(value,) if kind == "pattern" else BASE_VOCABULARY.patterns)


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(folder: str, kind: str, value: str, images: int = 48, prompts: int = 16, seed: int = 0) -> str:
    """``images`` training scenes into ``folder`` and ``prompts`` other scenes (other seeds) as
    a kohya prompt file ``folder/../<value>-prompts.txt`` (no CFG, fixed seeds); returns its path."""
    vocab = vocabulary(kind, value)
    os.makedirs(folder, exist_ok=True)
    for i, scene in enumerate(world.sample_scenes(images, seed=seed, combos=vocab.combinations())):
        stem = os.path.join(folder, f"{value}-{i:03d}")
        write_bytes_atomic(stem + ".png", _png(world.render(scene)))
        write_bytes_atomic(stem + ".txt", (world.caption(scene) + "\n").encode("utf-8"))
    lines = [f"{world.caption(s)} --w 32 --h 32 --d {10_000 + i} --s 20 --l 1"
             for i, s in enumerate(world.sample_scenes(prompts, seed=seed + 1, combos=vocab.combinations()))]
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), f"{value}-prompts.txt")
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def labels_of(caption: str) -> tuple[str, str, str, str]:
    """The inverse of ``world.caption``: (colour, shape, pattern, background)."""
    words = caption.split()
    if len(words) not in (5, 6) or words[0] != "a" or words[-2] != "on":
        raise UserError(f"{caption!r}: expected a lab caption like 'a red striped circle on white'")
    pattern = words[2] if len(words) == 6 else "solid"
    return words[1], words[-3], pattern, words[-1]


def score_samples(sample_dir: str, prompt_file: str, kind: str, value: str) -> dict:
    """Read the samples made before training and at the last step (the trainer's names)
    for the prompts of ``prompt_file``: the fraction showing the concept, and the fractions
    keeping the prompt's colour and background, before and after."""
    from PIL import Image

    from trainer.prompts import load_prompts

    prompts = load_prompts(prompt_file)
    by_tag: dict[str, dict[int, str]] = {}
    for name in os.listdir(sample_dir):
        m = SAMPLE_NAME.match(name)
        if m:
            by_tag.setdefault(m["tag"], {})[int(m["index"])] = os.path.join(sample_dir, name)
    steps = sorted(t for t in by_tag if t != "first")
    if "first" not in by_tag or not steps:
        raise UserError(f"{sample_dir}: expected samples from before training (sampling.sample_at_first) and "
                        f"from a later step; found {', '.join(sorted(by_tag)) or 'none'}")
    vocab = vocabulary(kind, value)
    shapes = tuple(dict.fromkeys(BASE_VOCABULARY.shapes + vocab.shapes))
    patterns = tuple(dict.fromkeys(BASE_VOCABULARY.patterns + vocab.patterns))
    axis = 2 if kind == "pattern" else 1
    out = {"concept": f"{kind} {value}", "samples": len(prompts)}
    for label, tag in (("before", "first"), ("after", steps[-1])):
        files = by_tag[tag]
        missing = [p.index for p in prompts if p.index not in files]
        if missing:
            raise UserError(f"{sample_dir}: samples {tag!r} lack prompt(s) {missing} of {prompt_file}")
        readings = []
        for p in prompts:
            rgb = torch.frombuffer(bytearray(Image.open(files[p.index]).convert("RGB").tobytes()), dtype=torch.uint8)
            image = rgb.view(32, 32, 3).permute(2, 0, 1)
            readings.append((score.read(image, shapes=shapes, patterns=patterns), labels_of(p.prompt)))
        n = len(readings)
        out[f"concept_{label}"] = round(sum(r.labels[axis] == want[axis] for r, want in readings) / n, 4)
        out[f"colour_{label}"] = round(sum(r.colour == want[0] for r, want in readings) / n, 4)
        out[f"background_{label}"] = round(sum(r.background == want[3] for r, want in readings) / n, 4)
        out[f"step_{label}"] = 0 if tag == "first" else int(tag)
    return out
