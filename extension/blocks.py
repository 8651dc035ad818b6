"""Per-block weights (``lbw=``): which block a layer belongs to, the block lists lbw's users
know, and named presets.

The lists are the ones the LoRA Block Weight extension (hako-mikan/sd-webui-lora-block-weight)
reads, so a list written for it means the same here; the length alone says which list it is:

- SDXL, 12 values: ``BASE, IN04, IN05, IN07, IN08, M00, OUT00–OUT05`` (the blocks that hold
  transformer layers, where SDXL LoRAs and QR-LoRAs live);
- SDXL, 20 values: ``BASE, IN00–IN08, M00, OUT00–OUT08`` (every block);
- FLUX, 61 values: ``CLIP, T5, IN, D00–D18, S00–S37, OUT`` (lbw's layout; ``IN`` is the
  ``img_in``/``txt_in``/``time_in``/``vector_in``/``guidance_in`` embedders, ``OUT`` the
  ``final_layer``);
- FLUX, 57 values: ``D00–D18, S00–S37``, the double and single blocks in model order, the part
  every FLUX block-weight tool shares (ComfyUI tools prepend their own extra slots).

``INnn`` / ``M00`` / ``OUTnn`` are the SGM checkpoint's ``input_blocks.nn`` / ``middle_block`` /
``output_blocks.nn`` (ResBlock and transformer alike); ``BASE`` is both text encoders, as in lbw.
A layer whose block has no slot in the list written keeps weight 1.

Presets: ``NAME:v1,…,vN`` lines (``#`` starts a comment), the built-in ones in
``block_presets.txt`` beside this file, the user's in ``qrlora_presets.txt`` in the QR-LoRA
folder (same name and length: the user's wins). Names are matched without regard to case,
and a name may have one list per layout (``ALL`` exists for SDXL and FLUX). Unlike lbw's
17-value presets (meant for SD 1.x, so that on SDXL even ``ALL`` switches off OUT00–OUT02),
every built-in SDXL preset is written in the 12-value SDXL list.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

BUILTIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_presets.txt")
USER_FILE_NAME = "qrlora_presets.txt"


@dataclass(frozen=True)
class Layout:
    arch: str
    ids: tuple[str, ...]
    title: str  # how messages and docs name it

    @property
    def length(self) -> int:
        return len(self.ids)


def _numbered(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(count)]


LAYOUTS: tuple[Layout, ...] = (
    Layout("sdxl", tuple(["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + _numbered("OUT", 6)),
           "BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05"),
    Layout("sdxl", tuple(["BASE"] + _numbered("IN", 9) + ["M00"] + _numbered("OUT", 9)),
           "BASE, IN00-IN08, M00, OUT00-OUT08"),
    Layout("flux", tuple(["CLIP", "T5", "IN"] + _numbered("D", 19) + _numbered("S", 38) + ["OUT"]),
           "CLIP, T5, IN, D00-D18, S00-S37, OUT"),
    Layout("flux", tuple(_numbered("D", 19) + _numbered("S", 38)), "D00-D18, S00-S37"),
)
ARCH_TITLES = {"sdxl": "SDXL", "flux": "FLUX"}


def layouts_for(arch: str) -> list[Layout]:
    return [lay for lay in LAYOUTS if lay.arch == arch]


def accepted_lengths() -> set[int]:
    return {lay.length for lay in LAYOUTS}


def expected(arch: str) -> str:
    """What ``lbw=`` takes on ``arch``, for messages."""
    parts = [f"{lay.length} weights ({lay.title})" for lay in layouts_for(arch)]
    return f"{ARCH_TITLES.get(arch, arch)} takes " + " or ".join(parts)


# ----------------------------------------------------------------- layer -> block
_SGM_UNET = "model.diffusion_model."
_SDXL_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")
_FLUX_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")
_FLUX_IN = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")


def block_of(arch: str, key: str) -> str | None:
    """The block id of the weight with original-layout key ``key`` (``Target.key``), or None
    for a weight outside every block."""
    if arch == "sdxl":
        if key.startswith("conditioner.embedders."):
            return "BASE"
        rest = key[len(_SGM_UNET):] if key.startswith(_SGM_UNET) else key
        if rest.startswith("middle_block."):
            return "M00"
        m = _SDXL_BLOCK.match(rest)
        if m:
            return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
        return None
    if arch == "flux":
        if key.startswith("text_encoders.clip_l.") or key.startswith("clip_l."):
            return "CLIP"
        if key.startswith("text_encoders.t5xxl.") or key.startswith("t5xxl."):
            return "T5"
        rest = key[len(_SGM_UNET):] if key.startswith(_SGM_UNET) else key
        m = _FLUX_BLOCK.match(rest)
        if m:
            return ("D" if m.group(1) == "double_blocks" else "S") + f"{int(m.group(2)):02d}"
        if rest.startswith(_FLUX_IN):
            return "IN"
        if rest.startswith("final_layer."):
            return "OUT"
        return None
    return None


# ----------------------------------------------------------------- weights
class BlockError(ValueError):
    """An ``lbw=`` value that cannot be used on this model; the message says what was expected."""


@dataclass(frozen=True)
class BlockWeights:
    """One tag's resolved ``lbw=``: a weight per block id of ``layout``."""

    spec: str  # as written (preset name or list), for identities and messages
    layout: Layout
    values: tuple[float, ...]

    def weight(self, block: str | None) -> float:
        if block is None or block not in self.layout.ids:
            return 1.0
        return self.values[self.layout.ids.index(block)]

    def for_key(self, key: str) -> float:
        return self.weight(block_of(self.layout.arch, key))


class NotANumber(ValueError):
    """Text that is not a finite number; ``parsed`` is True for text that is a number but not
    finite (``inf``, ``nan``), so callers can say which."""

    def __init__(self, text: str, parsed: bool):
        super().__init__(text)
        self.text = text
        self.parsed = parsed


def finite_number(text: str) -> float:
    """The one parser of the numbers users write in tags (λ, te=, unet=, lbw= weights, steps):
    ``float(text)`` when it is finite, else NotANumber."""
    try:
        value = float(text)
    except ValueError:
        raise NotANumber(text, parsed=False) from None
    if not math.isfinite(value):
        raise NotANumber(text, parsed=True)
    return value


def parse_list(text: str) -> tuple[float, ...]:
    """``"1,0,0.5"`` -> numbers; BlockError naming the first entry that is not a finite number."""
    values = []
    for i, part in enumerate(text.split(","), 1):
        part = part.strip()
        try:
            values.append(finite_number(part))
        except NotANumber as e:
            raise BlockError(f"weight {i} ({part!r}) is {'not a finite number' if e.parsed else 'not a number'}") from None
    return tuple(values)


def looks_like_list(spec: str) -> bool:
    return "," in spec or _is_number(spec)


def _is_number(text: str) -> bool:
    """A number, finite or not (``nan`` is a list of one bad weight, not a preset name)."""
    try:
        finite_number(text)
        return True
    except NotANumber as e:
        return e.parsed


def resolve(spec: str, arch: str, presets: "Presets") -> BlockWeights:
    """``lbw=`` value (a preset name or a list) -> weights for a model of ``arch``."""
    spec = spec.strip()
    if looks_like_list(spec):
        values = parse_list(spec)
        layout = next((lay for lay in layouts_for(arch) if lay.length == len(values)), None)
        if layout is None:
            raise BlockError(f"lbw= has {len(values)} weights; {expected(arch)}")
        return BlockWeights(spec, layout, values)
    found = presets.lookup(spec)
    if not found:
        raise BlockError(f"unknown preset {spec!r} (known: {', '.join(presets.names(arch)) or 'none'}); "
                         f"or write {expected(arch)}")
    for values in found:
        layout = next((lay for lay in layouts_for(arch) if lay.length == len(values)), None)
        if layout is not None:
            return BlockWeights(spec, layout, values)
    have = ", ".join(str(len(v)) for v in found)
    raise BlockError(f"preset {spec!r} has no {ARCH_TITLES.get(arch, arch)} list (it has {have} weights); "
                     f"{expected(arch)}")


# ----------------------------------------------------------------- presets
def parse_presets(text: str, source: str) -> tuple[dict[str, dict[int, tuple[float, ...]]], list[str]]:
    """Preset lines -> {lower-case name: {length: values}} and one problem per bad line."""
    out: dict[str, dict[int, tuple[float, ...]]] = {}
    problems = []
    lengths = accepted_lengths()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, values = line.partition(":")
        name = name.strip()
        if not sep or not name or not re.fullmatch(r"[\w.+-]+", name):
            problems.append(f"{source} line {number}: expected NAME:v1,v2,… (a name of letters, digits, _ . + -)")
            continue
        try:
            parsed = parse_list(values)
        except BlockError as e:
            problems.append(f"{source} line {number} ({name}): {e}")
            continue
        if len(parsed) not in lengths:
            problems.append(f"{source} line {number} ({name}): {len(parsed)} weights; expected one of "
                            f"{', '.join(str(n) for n in sorted(lengths))}")
            continue
        out.setdefault(name.lower(), {})[len(parsed)] = parsed
    return out, problems


class Presets:
    """The built-in presets plus the user's file, re-read when the file changes. Bad lines
    are reported once each through ``log`` and skipped."""

    def __init__(self, user_folder: Callable[[], str | None] = lambda: None, log: Callable[[str], None] = print,
                 builtin_file: str = BUILTIN_FILE):
        self._user_folder = user_folder
        self._log = log
        self._lock = threading.Lock()
        with open(builtin_file, encoding="utf-8") as f:
            self._builtin, problems = parse_presets(f.read(), os.path.basename(builtin_file))
        if problems:  # a broken repository file is our bug, not the user's
            raise ValueError("; ".join(problems))
        self._user_state = None
        self._user: dict[str, dict[int, tuple[float, ...]]] = {}
        self._reported: set[str] = set()

    def user_file(self) -> str | None:
        folder = self._user_folder()
        return os.path.join(folder, USER_FILE_NAME) if folder else None

    def _merged(self) -> dict[str, dict[int, tuple[float, ...]]]:
        with self._lock:
            path = self.user_file()
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            state = (path, st.st_mtime_ns, st.st_size) if st else None
            if state != self._user_state:
                self._user_state, self._user = state, {}
                if state:
                    try:
                        with open(path, encoding="utf-8") as f:
                            self._user, problems = parse_presets(f.read(), path)
                    except (OSError, UnicodeDecodeError) as e:
                        problems = [f"{path}: cannot be read ({e})"]
                    for p in problems:
                        if p not in self._reported:
                            self._reported.add(p)
                            self._log(f"{p}; line skipped")
            merged = {name: dict(v) for name, v in self._builtin.items()}
            for name, by_length in self._user.items():
                merged.setdefault(name, {}).update(by_length)
            return merged

    def lookup(self, name: str) -> list[tuple[float, ...]]:
        """Every list named ``name`` (any case), one per layout length."""
        return list(self._merged().get(name.strip().lower(), {}).values())

    def names(self, arch: str | None = None) -> list[str]:
        """Preset names (as the files spell them, lower-cased) usable on ``arch`` (all if None)."""
        lengths = {lay.length for lay in (layouts_for(arch) if arch else LAYOUTS)}
        return sorted(n for n, by_length in self._merged().items() if lengths & set(by_length))
