"""Scoring a run's samples at its end (``[sampling] scorer``): how many of the samples made
before training and at the last step show the concept the run was meant to teach.

The one scorer today is ``"lab:CONCEPT"``: a pattern or shape the lab base never saw
(``trainer.lab.concept``), read from each sample by the lab's exact scorers. It reads the
sample PNGs the trainer wrote, so it does not depend on the model family. At the end of the
run it makes the last step's samples if the sampling schedule did not, draws a before/after
grid (``NAME_before_after.png`` in the output folder), and prints one JSON line:
``concept_before`` / ``concept_after`` (fractions of samples showing the concept), the same
for the prompt's colour and background kept, ``n``, ``step_after``, ``seconds`` (the run's wall
time, models loading included) and ``grid``.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

PREFIX = "lab:"


def concepts() -> list[str]:
    """Every lab concept the base never saw: the world's patterns and shapes outside the base's."""
    from trainer.lab import world
    from trainer.lab.pretrain import BASE_VOCABULARY

    return [p for p in world.PATTERNS if p not in BASE_VOCABULARY.patterns] + \
           [s for s in world.SHAPES if s not in BASE_VOCABULARY.shapes]


def parse_scorer(text: str) -> tuple[str, str] | None:
    """``"lab:striped"`` -> ("pattern", "striped"); None when ``text`` names no known concept."""
    from trainer.lab import world

    if not text.startswith(PREFIX) or text[len(PREFIX):] not in concepts():
        return None
    value = text[len(PREFIX):]
    return ("pattern" if value in world.PATTERNS else "shape"), value


def scorer_problems(sampling, check_paths: bool = True) -> list[str]:
    """What keeps ``sampling.scorer`` from working, one sentence each (for the config's errors)."""
    from trainer.schema import suggest

    wanted = [PREFIX + c for c in concepts()]
    parsed = parse_scorer(sampling.scorer)
    if parsed is None:
        return [f"sampling.scorer: {sampling.scorer!r} is not a scorer; expected one of {', '.join(wanted)}"
                f" (a lab concept the lab base never saw){suggest(sampling.scorer, wanted)}"]
    problems = []
    if not sampling.sample_at_first:
        problems.append(f"sampling.scorer = {sampling.scorer!r} compares the samples before training with the last"
                        " ones, so it needs sampling.sample_at_first = true")
    if not sampling.prompts:
        return problems  # reported by the config's own sampling checks
    if isinstance(sampling.prompts, str) and not os.path.isfile(sampling.prompts):
        return problems  # a missing file is reported by the path check; without it, nothing to read
    for p in _prompts(sampling.prompts):
        if not _shows(p.prompt, *parsed):
            problems.append(f"sampling.prompts: prompt {p.index + 1} ({p.prompt!r}) is not a lab caption with"
                            f" {parsed[1]!r} (like 'a red striped circle on white' / 'a red star on white'), which"
                            f" sampling.scorer = {sampling.scorer!r} needs")
            break
    return problems


def _prompts(prompts) -> list:
    from trainer.prompts import load_prompts, parse_prompt_text

    if isinstance(prompts, str) and os.path.isfile(prompts):
        return load_prompts(prompts)
    return parse_prompt_text("\n".join([prompts] if isinstance(prompts, str) else prompts))


def _shows(prompt: str, kind: str, value: str) -> bool:
    from qrlora.errors import UserError
    from trainer.lab.concept import labels_of

    try:
        labels = labels_of(prompt)
    except UserError:
        return False
    return labels[2 if kind == "pattern" else 1] == value


def report(trainer) -> dict:
    """Score the run's first and last samples, write the grid, print the JSON line; returns it."""
    from qrlora.errors import UserError
    from trainer.lab.concept import fractions, judge_samples, sample_files
    from trainer.sampling import prompts_of

    cfg = trainer.cfg
    kind, value = parse_scorer(cfg.sampling.scorer)
    prompts = prompts_of(cfg)
    name, folder = trainer.output_name(), os.path.join(cfg.training.output_dir, "sample")
    last = f"{trainer.step:06d}"
    if last not in sample_files(folder, name):  # the sampling schedule missed the last step
        trainer.sample_images(last)
    by_tag = sample_files(folder, name)
    judged, out = {}, {"concept": f"{kind} {value}", "n": len(prompts)}
    for label, tag in (("before", "first"), ("after", last)):
        missing = [p.index + 1 for p in prompts if p.index not in by_tag.get(tag, {})]
        if missing:
            raise UserError(f"sampling.scorer: {folder} lacks the {label} sample(s) of prompt(s) {missing} of run"
                            f" {name!r} (tag {tag!r}); a resumed run keeps the first run's, so keep its sample folder")
        judged[label] = judge_samples(by_tag[tag], prompts, kind, value)
        out.update(fractions(label, judged[label]))
    out["step_after"] = trainer.step
    grid = os.path.join(cfg.training.output_dir, f"{name}_before_after.png")
    write_grid(grid, [[by_tag["first"][p.index] for p in prompts], [by_tag[last][p.index] for p in prompts]],
               [[j[0] for j in judged["before"]], [j[0] for j in judged["after"]]],
               [f"before (step 0): {value} {_count(judged['before'])}",
                f"after (step {trainer.step}): {value} {_count(judged['after'])}"])
    out["grid"] = grid
    out["seconds"] = round(time.time() - trainer.created_at, 1)
    trainer.say(json.dumps(out))
    return out


def _count(judged) -> str:
    return f"{sum(j[0] for j in judged)}/{len(judged)}"


CELL_SCALE = 3  # a 32-pixel sample drawn 96 pixels wide
FRAME = 3  # pixels of the frame that says whether the scorer saw the concept
SHOWN, NOT_SHOWN = (40, 180, 60), (200, 200, 200)


def write_grid(path: str, columns: list[list[str]], shown: list[list[bool]], titles: list[str]) -> None:
    """One block of samples per entry of ``columns`` (before, after), side by side, each under
    its title; a green frame marks a sample in which the scorer found the concept."""
    from PIL import Image, ImageDraw

    from qrlora.checkpoint import write_bytes_atomic

    images = [[Image.open(p).convert("RGB") for p in paths] for paths in columns]
    cell = max(im.width for block in images for im in block) * CELL_SCALE + 2 * FRAME
    per_row = math.ceil(math.sqrt(len(images[0])))  # 16 samples: 4 x 4
    rows = -(-len(images[0]) // per_row)
    title_h, gap, footer_h = 20, 16, 18
    block_w = per_row * (cell + 2)
    height = title_h + rows * (cell + 2) + footer_h
    canvas = Image.new("RGB", (len(images) * block_w + (len(images) - 1) * gap, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, height - footer_h + 4), "green frame: the scorer finds the concept in the sample; the same prompts"
              " and seeds in each block", fill=(0, 0, 0))
    for b, (block, marks, title) in enumerate(zip(images, shown, titles)):
        x0 = b * (block_w + gap)
        draw.text((x0 + 2, 4), title, fill=(0, 0, 0))
        for i, (im, mark) in enumerate(zip(block, marks)):
            x, y = x0 + (i % per_row) * (cell + 2), title_h + (i // per_row) * (cell + 2)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=SHOWN if mark else NOT_SHOWN)
            big = im.resize((im.width * CELL_SCALE, im.height * CELL_SCALE), Image.NEAREST)
            canvas.paste(big, (x + FRAME, y + FRAME))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    write_bytes_atomic(path, buf.getvalue())
