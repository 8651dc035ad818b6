"""The ``<qrlora:…>`` tag and the infotext field, without any host.

A WebUI splits ``<qrlora:dog:0.8:te=0.5>`` at ``:`` into items ``["dog", "0.8", "te=0.5"]``
(A1111 v1.10 / Forge ``modules/extra_networks.py``: ``parse_prompt``, ``ExtraNetworkParams``:
an item with exactly one ``=`` split is named, everything else positional). Positional
arguments are the name and λ; everything else is ``key=value``:

- ``te=`` / ``unet=``: λ for the text-encoder / UNet layers (default: λ), as Lora's
  ``<lora:name:te=…:unet=…>``;
- ``lbw=``: per-block weights, a preset name or a list in lbw's block lists (``blocks.py``);
  the list's numbers are checked here, its length against the loaded model by the engine;
- ``start=`` / ``stop=`` (or lbw's ``step=FIRST-END``): the sampling step window, whole
  numbers ≥ 0 as lbw reads them; the tag's UNet/transformer layers apply on the steps
  ``start ≤ step < stop`` of each sampling pass, the first step being 0 (``planner.py``);
- the keys other tags know (``RESERVED``) give a readable warning and are ignored; any other
  key makes the tag unusable (one message, the tag is skipped).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from . import blocks

TAG = "qrlora"
INFOTEXT_KEY = "QR-LoRA hashes"

# key -> why it is ignored, for keys other tags know
RESERVED = {
    "preset": "write block presets as lbw=NAME",
    "lbwe": "lbw's elemental weights (lbwe=) are not supported; use lbw=",
    "dyn": "dyn= has no meaning for QR-LoRA (the rank is fixed by the basis)",
}
KNOWN = ("te", "unet", "lbw", "start", "stop", "step")


class TagError(ValueError):
    """A tag that cannot be used at all (no name, bad λ, a name reaching outside the folder)."""


@dataclass
class Tag:
    name: str
    multiplier: float
    te: float
    unet: float
    options: dict[str, str] = field(default_factory=dict)  # ignored keys other tags know
    warnings: list[str] = field(default_factory=list)
    lbw: str | None = None  # per-block weights as written: a preset name or a list
    start: int | None = None  # first sampling step the tag applies to (steps count from 0)
    stop: int | None = None  # first sampling step it no longer applies to

    def multiplier_for(self, text_encoder: bool) -> float:
        return self.te if text_encoder else self.unet


def split_items(items: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Positional and named items, as the WebUIs split them."""
    positional, named = [], {}
    for item in items:
        parts = str(item).split("=", 2)
        if len(parts) == 2:
            named[parts[0].strip().lower()] = parts[1].strip()
        else:
            positional.append(str(item))
    return positional, named


def check_name(name: str) -> str:
    """The name normalised to ``/`` separators; refuses anything that is not a plain relative name."""
    name = name.strip().replace("\\", "/")
    if not name:
        raise TagError("a <qrlora:…> tag needs a file name: <qrlora:name:1.0>")
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\x00" in name or any(p in ("", ".") for p in parts):
        raise TagError(
            f"<qrlora:{name}>: names must refer to files inside the QR-LoRA folder "
            "(a file name or a path relative to the folder, without '..')"
        )
    return name


def _number(text: str, what: str, tag: str) -> float:
    try:
        return blocks.finite_number(text)
    except blocks.NotANumber as e:
        if e.parsed:
            raise TagError(f"<qrlora:{tag}>: {what} must be a finite number, not {text!r}") from None
        raise TagError(f"<qrlora:{tag}>: {what} {text!r} is not a number") from None


def _step(text: str, key: str, tag: str) -> int:
    """A step number as lbw reads ``start=``/``stop=`` (``int(...)``: whole steps, no fractions)."""
    expected = f"<qrlora:{tag}>: {key}= expects a sampling step (a whole number ≥ 0, the first step is 0)"
    try:
        value = blocks.finite_number(text)
    except blocks.NotANumber:
        raise TagError(f"{expected}, not {text!r}") from None
    if value < 0:
        raise TagError(f"{expected}, not {text!r}")
    if not value.is_integer():
        raise TagError(f"{expected}, not {text!r} (fractions of the steps are not taken, as in lbw)")
    return int(value)


def _step_range(text: str, tag: str) -> tuple[int, int]:
    """lbw's ``step=FIRST-END``: the same window as ``start=FIRST:stop=END``."""
    first, sep, end = text.partition("-")
    if not sep:
        raise TagError(f"<qrlora:{tag}>: step= expects FIRST-END (as lbw's step=5-10), not {text!r}")
    return _step(first.strip(), "step", tag), _step(end.strip(), "step", tag)


def _unknown(key: str, value: str, tag: str) -> TagError:
    """An option we do not know: the tag is skipped, since applying it without the option
    would silently give another image (a misspelt ``strat=`` would apply at every step)."""
    near = difflib.get_close_matches(key, KNOWN + tuple(RESERVED), n=1)
    hint = f"did you mean {near[0]}=?" if near else "known: " + ", ".join(f"{k}=" for k in KNOWN)
    return TagError(f"<qrlora:{tag}>: unknown option {key}={value} ({hint}); tag skipped")


def _lbw(text: str, tag: str) -> str:
    spec = text.strip()
    if not spec:
        raise TagError(f"<qrlora:{tag}>: lbw= needs a preset name or a list of block weights")
    if blocks.looks_like_list(spec):
        try:
            values = blocks.parse_list(spec)
        except blocks.BlockError as e:
            raise TagError(f"<qrlora:{tag}>: lbw= {e}; expected numbers separated by commas "
                           f"(SDXL 12 or 20 weights, FLUX 61 or 57) or a preset name") from None
        if len(values) not in blocks.accepted_lengths():
            raise TagError(f"<qrlora:{tag}>: lbw= has {len(values)} weights; expected SDXL 12 or 20, FLUX 61 or 57, "
                           "or a preset name")
    elif not re.fullmatch(r"[\w.+-]+", spec):
        raise TagError(f"<qrlora:{tag}>: lbw={spec} is neither a preset name nor a list of numbers")
    return spec


def parse_tag(items: Sequence[str], default_multiplier: float = 1.0) -> Tag:
    """One tag's items -> Tag; TagError if it cannot be used."""
    positional, named = split_items(items)
    if not positional:
        raise TagError("a <qrlora:…> tag needs a file name: <qrlora:name:1.0>")
    name = check_name(positional[0])
    warnings = []
    multiplier = float(default_multiplier)
    if len(positional) > 1 and positional[1].strip():
        multiplier = _number(positional[1].strip(), "λ", name)
    if len(positional) > 2:
        extra = ":".join(positional[2:])
        warnings.append(
            f"<qrlora:{name}>: extra argument {extra!r} ignored; use te=… / unet=… for separate multipliers"
        )
    te = unet = multiplier
    options = {}
    lbw = start = stop = None
    for key, value in named.items():
        if key == "te":
            te = _number(value, "te=", name)
        elif key == "unet":
            unet = _number(value, "unet=", name)
        elif key == "lbw":
            lbw = _lbw(value, name)
        elif key == "start":
            start = _step(value, key, name)
        elif key == "stop":
            stop = _step(value, key, name)
        elif key in RESERVED:
            options[key] = value
            warnings.append(f"<qrlora:{name}>: {RESERVED[key]}; {key}={value} ignored")
        elif key != "step":
            raise _unknown(key, value, name)
    if "step" in named:
        if "start" in named or "stop" in named:
            raise TagError(f"<qrlora:{name}>: write the step window either as step=FIRST-END or as start=/stop=, "
                           "not both")
        start, stop = _step_range(named["step"], name)
    if start is not None and stop is not None and stop <= start:
        raise TagError(f"<qrlora:{name}>: stop={stop} must be after start={start} (steps count from 0)")
    return Tag(name, multiplier, te, unet, options, warnings, lbw, start, stop)


# ----------------------------------------------------------------- infotext
_REMOVE = str.maketrans("", "", ":,")


def infotext_name(name: str) -> str:
    """A name as it can appear in ``QR-LoRA hashes`` (Lora strips ``:`` and ``,`` the same way)."""
    return name.translate(_REMOVE)


def format_hashes(hashes: Mapping[str, str]) -> str:
    return ", ".join(f"{infotext_name(k)}: {v}" for k, v in hashes.items() if v)


def parse_hashes(text: str | None) -> dict[str, str]:
    out = {}
    for part in (text or "").split(","):
        name, sep, value = part.partition(":")
        if sep and name.strip() and value.strip():
            out[name.strip()] = value.strip().lower()
    return out


_RE_TAG_NAME = re.compile(r"<qrlora:([^:>]+)([:>])")


def rewrite_prompt(prompt: str, hashes: Mapping[str, str], name_for_hash: Callable[[str], str | None]) -> str:
    """Point each ``<qrlora:NAME:`` whose NAME has a recorded hash at the file that has that
    hash now (a renamed or moved file), as Lora's ``infotext_pasted`` does for ``Lora hashes``."""

    def replace(m: re.Match) -> str:
        short = hashes.get(infotext_name(m.group(1)))
        current = name_for_hash(short) if short else None
        return f"<qrlora:{current}{m.group(2)}" if current else m.group(0)

    return _RE_TAG_NAME.sub(replace, prompt)
