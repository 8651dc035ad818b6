"""Axes for the built-in X/Y/Z plot script: "QR-LoRA λ", "QR-LoRA file", "QR-LoRA block weights".

Host interface (A1111 v1.10 ``scripts/xyz_grid.py``, the same file in Forge): the script's
module is found in ``modules.scripts.scripts_data`` (``ScriptClassData(script_class, path,
basedir, module)``; scripts are loaded by path, so the class's ``__module__`` is
``"xyz_grid.py"``), and ``AxisOption(label, type, apply, format_value, confirm, cost, choices)``
objects are appended to its ``axis_options`` list. Per cell the script copies ``p``, calls
``apply(pc, value, values)`` and runs ``process_images(pc)``; ``confirm(p, values)`` runs once
before the grid and may raise to stop it; str values are split as CSV, so a quoted
``"1,0,…"`` stays one value.

Each axis rewrites the ``<qrlora:…>`` tags of the cell's prompt (and hires prompt), so the
image's infotext says exactly what was applied and pastes back; a λ or block-weight sweep
only re-fuses the small ΔR (the basis comes from the resolver's cache).
"""

from __future__ import annotations

import os
import re
from typing import Callable

from . import blocks, syntax

LABEL_LAMBDA = "QR-LoRA λ"
LABEL_FILE = "QR-LoRA file"
LABEL_BLOCKS = "QR-LoRA block weights"
LABELS = (LABEL_LAMBDA, LABEL_FILE, LABEL_BLOCKS)
_TAG = re.compile(r"<qrlora:([^>]*)>")


# ----------------------------------------------------------------- prompt edits
def _split_value(value: str) -> tuple[str | None, str]:
    """``"0.5"`` -> (None, "0.5") for every tag; ``"dog=0.5"`` -> ("dog", "0.5")."""
    name, sep, rest = str(value).partition("=")
    return (name.strip(), rest.strip()) if sep else (None, name.strip())


def _edit_tags(prompt: str, name: str | None, edit: Callable[[list[str], dict], list[str]]) -> tuple[str, int]:
    """Apply ``edit(positional, named)`` to the tags (all, or those named ``name``); returns
    the prompt and how many tags were edited."""
    count = 0

    def replace(m: re.Match) -> str:
        nonlocal count
        items = m.group(1).split(":")
        positional, named = syntax.split_items(items)
        if not positional or (name is not None and positional[0].strip() != name):
            return m.group(0)
        count += 1
        positional = edit(positional, named)
        return "<qrlora:" + ":".join(positional + [f"{k}={v}" for k, v in named.items()]) + ">"

    return _TAG.sub(replace, prompt or ""), count


def set_lambda(prompt: str, value: str) -> tuple[str, int]:
    name, lam = _split_value(value)

    def edit(positional, named):
        return [positional[0], lam] + positional[2:]

    return _edit_tags(prompt, name, edit)


def set_blocks(prompt: str, value: str) -> tuple[str, int]:
    name, spec = _split_value(value)

    def edit(positional, named):
        named["lbw"] = spec
        return positional

    return _edit_tags(prompt, name, edit)


def set_file(prompt: str, file_name: str) -> str:
    """The first tag's file becomes ``file_name`` (λ and options kept); without a tag, one is added."""
    done = []

    def edit(positional, named):
        if done:
            return positional
        done.append(True)
        return [file_name] + positional[1:]

    out, _ = _edit_tags(prompt, None, edit)
    return out if done else f"{prompt} <qrlora:{file_name}>"


def _prompts(p):
    return [f for f in ("prompt", "hr_prompt") if isinstance(getattr(p, f, None), str) and getattr(p, f)]


# ----------------------------------------------------------------- the axes
def make_axes(xyz_module, engine):
    AxisOption = xyz_module.AxisOption

    def apply_lambda(p, x, xs):
        for field in _prompts(p):
            setattr(p, field, set_lambda(getattr(p, field), x)[0])

    def confirm_lambda(p, xs):
        for x in xs:
            name, lam = _split_value(x)
            try:
                float(lam)
            except ValueError:
                raise RuntimeError(f"{LABEL_LAMBDA}: {x!r} is not λ or NAME=λ (e.g. 0.5 or dog=0.5)") from None
            if set_lambda(getattr(p, "prompt", ""), x)[1] == 0:
                which = f"<qrlora:{name}…>" if name else "<qrlora:…>"
                raise RuntimeError(f"{LABEL_LAMBDA}: the prompt has no {which} tag for {x!r} to change")

    def apply_blocks(p, x, xs):
        for field in _prompts(p):
            setattr(p, field, set_blocks(getattr(p, field), x)[0])

    def confirm_blocks(p, xs):
        for x in xs:
            name, spec = _split_value(x)
            try:
                syntax.parse_tag([name or "x", f"lbw={spec}"])
            except syntax.TagError as e:
                raise RuntimeError(f"{LABEL_BLOCKS}: {e}") from None
            if not blocks.looks_like_list(spec) and not engine.presets.lookup(spec):
                known = ", ".join(engine.presets.names())
                raise RuntimeError(f"{LABEL_BLOCKS}: unknown preset {spec!r} (known: {known})")
            if set_blocks(getattr(p, "prompt", ""), x)[1] == 0:
                raise RuntimeError(f"{LABEL_BLOCKS}: the prompt has no <qrlora:{name or ''}…> tag for {x!r} to change")

    def apply_file(p, x, xs):
        for field in _prompts(p) or ["prompt"]:
            setattr(p, field, set_file(getattr(p, field, "") or "", x))

    def confirm_file(p, xs):
        for x in xs:
            try:
                engine.library.resolve(syntax.check_name(x))
            except (LookupError, syntax.TagError) as e:
                raise RuntimeError(f"{LABEL_FILE}: {e}") from None

    def format_file(p, opt, x):
        return f"{opt.label}: {os.path.basename(x)}"

    def file_choices():
        return sorted(e.name for e in engine.library.entries())

    return [
        AxisOption(LABEL_LAMBDA, str, apply_lambda, confirm=confirm_lambda),
        AxisOption(LABEL_FILE, str, apply_file, format_value=format_file, confirm=confirm_file, cost=0.5,
                   choices=file_choices),
        AxisOption(LABEL_BLOCKS, str, apply_blocks, confirm=confirm_blocks,
                   choices=lambda: engine.presets.names()),
    ]


def find_xyz_module(scripts_data):
    for data in scripts_data:
        cls = getattr(data, "script_class", None)
        if getattr(cls, "__module__", "") == "xyz_grid.py" or os.path.basename(getattr(data, "path", "") or "") == "xyz_grid.py":
            return getattr(data, "module", None)
    return None


def register(scripts_module, engine, log=print) -> bool:
    """Add our axes once (a reload of the UI or of this script adds nothing twice)."""
    module = find_xyz_module(getattr(scripts_module, "scripts_data", []))
    if module is None or not hasattr(module, "axis_options") or not hasattr(module, "AxisOption"):
        log("the X/Y/Z plot script was not found; QR-LoRA axes are not added")
        return False
    module.axis_options[:] = [o for o in module.axis_options if getattr(o, "label", "") not in LABELS]
    module.axis_options.extend(make_axes(module, engine))
    return True
