"""Sample prompts in kohya's formats.

``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped; options
follow the prompt as `` --<flag> <value>`` (split on " --", as kohya does, so a flag needs a
space before it):

    --n  negative prompt (the rest of that part)     --w  width       --h  height
    --d  seed                                        --s  steps (clamped to 1..1000)
    --l  CFG scale                                   --ss sampler name

Options kohya knows for other model kinds or features (``--g`` FLUX guidance, ``--fs`` flow
shift, ``--cn``, ``--ctr``, ``--rcfg``, ``--f``) are kept in ``extra`` so a family can use them;
anything else is reported in ``unknown`` (kohya silently ignores it).
``.toml`` (``[prompt]`` defaults + ``[[prompt.subset]]``) and ``.json`` (a list of objects
or strings) use kohya's key names: prompt, negative_prompt, width, height, seed,
sample_steps, scale, sample_sampler.

A field left None means "the caller's default" (the trainer's sampling settings, else
kohya's: 30 steps, CFG 7.5, a random seed; the size defaults to the model's native one).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Iterable

from qrlora.errors import UserError

KOHYA_STEPS, KOHYA_SCALE = 30, 7.5


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    scale: float | None = None
    sampler: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # kohya flags we parse but do not use here
    unknown: list[str] = field(default_factory=list)  # options not understood, for a warning
    index: int = 0  # position in the file: kohya numbers sample images by it

    def with_defaults(self, **defaults) -> "SamplePrompt":
        """A copy whose None fields take the given values (unknown names raise TypeError)."""
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **fill)


# (flag, value pattern, field, converter); tried in this order on each " --" part.
_FLAGS = (
    ("w", r"(\d+)", "width", int),
    ("h", r"(\d+)", "height", int),
    ("d", r"(\d+)", "seed", int),
    ("s", r"(\d+)", "steps", lambda v: max(1, min(1000, int(v)))),
    ("l", r"([\d.]+)", "scale", float),
    ("n", r"(.+)", "negative_prompt", str),
    ("ss", r"(.+)", "sampler", str),
)
_EXTRA_FLAGS = ("g", "fs", "cn", "ctr", "rcfg", "f")
_FLAG_RE = [(re.compile(rf"{flag} {pattern}$", re.IGNORECASE | re.DOTALL), name, conv) for flag, pattern, name, conv in _FLAGS]
_EXTRA_RE = re.compile(rf"({'|'.join(_EXTRA_FLAGS)}) (.+)$", re.IGNORECASE | re.DOTALL)

# kohya's key names in .toml/.json prompt files -> our fields
_KOHYA_KEYS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
    "seed": "seed", "sample_steps": "steps", "scale": "scale", "sample_sampler": "sampler",
}


def parse_prompt_line(line: str, index: int = 0) -> SamplePrompt:
    """One kohya prompt line -> SamplePrompt."""
    parts = line.strip().split(" --")
    sample = SamplePrompt(prompt=parts[0].strip(), index=index)
    for part in parts[1:]:
        part = part.strip()
        if not part:
            continue
        for pattern, name, conv in _FLAG_RE:
            m = pattern.match(part)
            if m:
                try:
                    setattr(sample, name, conv(m.group(1).strip()))
                except ValueError:  # "--l 1.2.3"
                    sample.unknown.append("--" + part)
                break
        else:
            m = _EXTRA_RE.match(part)
            if m:
                sample.extra[m.group(1).lower()] = m.group(2).strip()
            else:
                sample.unknown.append("--" + part)
    return sample


def parse_prompt_text(text: str) -> list[SamplePrompt]:
    """The prompts of a ``.txt`` prompt file's contents."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    return [parse_prompt_line(ln, i) for i, ln in enumerate(lines)]


def _from_mapping(item: dict, index: int, where: str) -> SamplePrompt:
    unknown = sorted(set(item) - set(_KOHYA_KEYS) - {"enum", "subset"})
    fields = {_KOHYA_KEYS[k]: v for k, v in item.items() if k in _KOHYA_KEYS}
    if not isinstance(fields.get("prompt"), str):
        raise UserError(f"{where}: prompt {index} has no 'prompt' string")
    sample = SamplePrompt(index=index, **fields)
    sample.unknown.extend(unknown)
    if sample.steps is not None:
        sample.steps = max(1, min(1000, int(sample.steps)))
    return sample


def load_prompts(path: str) -> list[SamplePrompt]:
    """Prompts from a kohya ``.txt``, ``.toml`` or ``.json`` prompt file."""
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM from a Windows editor is not text
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    if ext == ".toml":
        from trainer.tomlfile import parse_toml

        data = parse_toml(text, path).get("prompt", {})
        if not isinstance(data, dict) or not isinstance(data.get("subset", []), list):
            raise UserError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
        base = {k: v for k, v in data.items() if k != "subset"}
        items: Iterable = [dict(base, **sub) for sub in data.get("subset", []) if isinstance(sub, dict)]
    elif ext == ".json":
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON list of prompts")
    else:
        return parse_prompt_text(text)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(parse_prompt_line(item, i))
        elif isinstance(item, dict):
            out.append(_from_mapping(item, i, path))
        else:
            raise UserError(f"{path}: prompt {i} is neither a string nor a table")
    return out
