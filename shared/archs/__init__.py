"""Model architectures: which linear layers exist, what they are called in each layout.

Every target has one layout-independent name: the diffusers module path with a component
prefix (``unet.``, ``te1.``, ``te2.`` for SDXL; ``transformer.`` for FLUX). ΔR files, basis
files and the trainer use that name. ``Target.key`` and ``Target.rows`` say where the weight
lives in the original single-file layout (SGM for SDXL, BFL for FLUX), which is what the
WebUIs hold and what users have on disk.

An architecture is added by adding one module here that defines an ``Architecture``
subclass and calls ``register``. Nothing else branches on the architecture's name.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence

from ..errors import UserError


@dataclass(frozen=True)
class Target:
    """One targeted linear layer."""

    name: str  # layout-independent name, e.g. "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    key: str  # weight key in the original single-file checkpoint
    rows: tuple[int, int] | None  # [start, stop) rows of a fused original weight, else None
    shape: tuple[int, int]  # (out, in) of this target, after slicing

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


class Architecture:
    """What the rest of the project needs to know about one model family."""

    name: str = ""  # short id used in files and on the command line: "sdxl", "flux"
    title: str = ""  # human name
    base_model_version: str = ""  # kohya's ss_base_model_version
    modelspec_architecture: str = ""  # modelspec.architecture of a LoRA for this model
    modelspec_implementation: str = ""
    resolution: str = ""  # modelspec.resolution
    # preset name -> glob patterns over target names (fnmatch; "re:" prefix for a regex)
    presets: dict[str, tuple[str, ...]] = {}
    default_preset: str = ""
    # first part of a target name -> the diffusers pipeline component that holds it
    diffusers_components: dict[str, str] = {}

    def detect(self, keys: Collection[str]) -> bool:
        """True if an original-layout checkpoint with these keys is this architecture."""
        raise NotImplementedError

    def linear_targets(self, shapes: Mapping[str, Sequence[int]]) -> list[Target]:
        """Every linear layer of the model that can be targeted, in model order.

        ``shapes`` maps the original-layout checkpoint's keys to tensor shapes (read from the
        file header, no tensor is loaded). Counts and widths come from it, never constants.
        """
        raise NotImplementedError

    def structure(self, names: Iterable[str]) -> dict[str, int]:
        """Counts that describe the model's depth from its target names (``qrlora inspect``),
        e.g. FLUX's double and single blocks; empty when the architecture names none."""
        return {}

    def open_folder(self, path: str):
        """A diffusers model folder of this architecture read as its original-layout single file
        (``SafetensorsFile``'s reading interface), or None when ``path`` is not one."""
        return None

    def kohya_module(self, target: Target) -> tuple[str, tuple[int, int] | None, int]:
        """kohya LoRA module name for ``target``, the rows it covers in that module's
        weight (None = all rows), and that module's full out_features."""
        raise NotImplementedError

    # ----------------------------------------------------------------- selection
    def select(self, targets: Iterable[Target], spec: str | Sequence[str]) -> list[Target]:
        """Targets matching a preset name or a list of patterns, in model order."""
        patterns = self.patterns(spec)
        chosen = [t for t in targets if any(_match(p, t.name) for p in patterns)]
        if not chosen:
            raise UserError(f"targets {spec!r} match no layer of this {self.title} model")
        return chosen

    def patterns(self, spec: str | Sequence[str]) -> tuple[str, ...]:
        """Glob/regex patterns for a preset name, a pattern, or a list mixing both."""
        if not isinstance(spec, str):
            return tuple(p for item in spec for p in self.patterns(item))
        if spec in self.presets:
            return self.presets[spec]
        if not any(ch in spec for ch in "*?[.") and not spec.startswith("re:"):
            known = ", ".join(sorted(self.presets))
            raise UserError(f"unknown {self.title} target preset {spec!r}; presets: {known}; or give patterns")
        return (spec,)


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


def _load_builtin() -> None:
    # Import the bundled families once; each module registers itself.
    from . import flux, sdxl  # noqa: F401


def get(name: str) -> Architecture:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def open_model(path: str):
    """What a basis is read from: a single ``.safetensors`` file, or a diffusers model folder
    seen in the original layout by the architecture it belongs to."""
    import os

    from ..checkpoint import FileFormatError, SafetensorsFile

    if not os.path.isdir(path):
        return SafetensorsFile(path)
    _load_builtin()
    for arch in _REGISTRY.values():
        view = arch.open_folder(path)
        if view is not None:
            return view
    raise FileFormatError(f"{path}: a folder, but not a diffusers model folder this qrlora reads"
                          " (a FLUX pipeline or transformer folder); give a single .safetensors file")


def detect(keys: Collection[str]) -> Architecture | None:
    """The architecture of an original-layout checkpoint, from its keys; None if unknown."""
    _load_builtin()
    for arch in _REGISTRY.values():
        if arch.detect(keys):
            return arch
    return None


def target_set_hash(targets: Sequence[Target]) -> str:
    """A short digest of the layer set (names and shapes, in order)."""
    import hashlib

    h = hashlib.sha256()
    for t in targets:
        h.update(f"{t.name}:{t.shape[0]}x{t.shape[1]};".encode())
    return h.hexdigest()[:16]
