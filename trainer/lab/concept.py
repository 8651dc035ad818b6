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


def sample_files(sample_dir: str, name: str | None = None) -> dict[str, dict[int, str]]:
    """The trainer's samples in ``sample_dir``: {tag ("first" or the step): {prompt index: path}};
    only those of run ``name`` (the trainer's output_name) when given."""
    by_tag: dict[str, dict[int, str]] = {}
    for file in os.listdir(sample_dir):
        m = SAMPLE_NAME.match(file)
        if m and (name is None or m["name"] == name):
            by_tag.setdefault(m["tag"], {})[int(m["index"])] = os.path.join(sample_dir, file)
    return by_tag


def judge_samples(files: dict[int, str], prompts, kind: str, value: str) -> list[tuple[bool, bool, bool]]:
    """For each prompt (the trainer's ``SamplePrompt``s; their index names the file): whether
    its sample shows the concept, keeps the prompt's colour, keeps its background."""
    from PIL import Image

    vocab = vocabulary(kind, value)
    shapes = tuple(dict.fromkeys(BASE_VOCABULARY.shapes + vocab.shapes))
    patterns = tuple(dict.fromkeys(BASE_VOCABULARY.patterns + vocab.patterns))
    axis = 2 if kind == "pattern" else 1
    out = []
    for p in prompts:
        with Image.open(files[p.index]) as img:
            rgb = img.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        reading = score.read(pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1), shapes=shapes, patterns=patterns)
        want = labels_of(p.prompt)
        out.append((reading.labels[axis] == want[axis], reading.colour == want[0], reading.background == want[3]))
    return out


def fractions(label: str, judged: list[tuple[bool, bool, bool]]) -> dict[str, float]:
    """``concept_<label>``, ``colour_<label>``, ``background_<label>``: the fractions of ``judged``."""
    n = len(judged)
    return {f"{what}_{label}": round(sum(j[i] for j in judged) / n, 4)
            for i, what in enumerate(("concept", "colour", "background"))}


def score_samples(sample_dir: str, prompt_file: str, kind: str, value: str) -> dict:
    """Read the samples made before training and at the last step (the trainer's names)
    for the prompts of ``prompt_file``: the fraction showing the concept, and the fractions
    keeping the prompt's colour and background, before and after."""
    from trainer.prompts import load_prompts

    prompts = load_prompts(prompt_file)
    by_tag = sample_files(sample_dir)
    steps = sorted(t for t in by_tag if t != "first")
    if "first" not in by_tag or not steps:
        raise UserError(f"{sample_dir}: expected samples from before training (sampling.sample_at_first) and "
                        f"from a later step; found {', '.join(sorted(by_tag)) or 'none'}")
    vocabulary(kind, value)
    out = {"concept": f"{kind} {value}", "samples": len(prompts)}
    for label, tag in (("before", "first"), ("after", steps[-1])):
        files = by_tag[tag]
        missing = [p.index for p in prompts if p.index not in files]
        if missing:
            raise UserError(f"{sample_dir}: samples {tag!r} lack prompt(s) {missing} of {prompt_file}")
        out.update(fractions(label, judge_samples(files, prompts, kind, value)))
        out[f"step_{label}"] = 0 if tag == "first" else int(tag)
    return out
