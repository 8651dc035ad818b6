"""The extension's settings, host-independent: what they are, their defaults, how to read them.

``webui.register_options`` turns these into the host's ``OptionInfo``s at script load
(``shared.options_templates.update(shared.options_section(...))``, as the built-in Lora does),
which also makes them exist with ``--nowebui``; values are always read through ``Options``
with the defaults below as a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# (section id, label, settings category). A1111 v1.7+ and Forge group sections in the settings
# sidebar by category; a section without one lands under "Uncategorized". The built-in Lora's
# options join the "Extra Networks" section, which modules/shared_options.py files under the
# "sd" ("Stable Diffusion") category: ours goes there too.
SECTION = ("qrlora", "QR-LoRA", "sd")


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    label: str
    kind: str  # "text", "bool", "choice", "slider"
    choices: tuple = ()
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    info: str = ""


SETTINGS = (
    Setting("qrlora_dir", "", "QR-LoRA folder", "text",
            info="empty: the --qrlora-dir command-line option (default models/QRLoRA)"),
    Setting("qrlora_basis_dir", "", "Basis cache folder", "text",
            info="empty: the --qrlora-basis-dir command-line option (default models/QRLoRA/basis)"),
    Setting("qrlora_basis_device", "auto", "Device for computing a basis", "choice", ("auto", "cpu", "cuda"),
            info="auto: the GPU when there is one; needed once per checkpoint and rank"),
    Setting("qrlora_mismatch_policy", "warn", "When a file's basis differs from the loaded checkpoint's", "choice",
            ("warn", "refuse", "apply"), info="warn: apply and say by how much; refuse: skip the file; apply: apply quietly"),
    Setting("qrlora_mismatch_threshold", 1.0, "Basis difference tolerated without a warning (%)", "slider",
            minimum=0.0, maximum=20.0, step=0.1, info="an fp16 copy of the base differs by ~0.1 %, bf16 by up to 1 %, fp8 by 4-15 %"),
    Setting("qrlora_default_multiplier", 1.0, "Default λ for <qrlora:name>", "slider", minimum=-2.0, maximum=2.0, step=0.05),
    Setting("qrlora_add_hashes_to_infotext", True, "Add QR-LoRA hashes to infotext", "bool"),
)
BY_KEY = {s.key: s for s in SETTINGS}


class Options:
    """Typed access to the host's option values (a ``getter(key, default)``)."""

    def __init__(self, getter: Callable[[str, Any], Any]):
        self._get = getter

    def __call__(self, key: str):
        default = BY_KEY[key].default
        try:
            value = self._get(key, default)
        except Exception:  # a host without the option (never registered): use the default
            value = default
        return default if value is None else value

    def text(self, key: str) -> str:
        return str(self(key) or "").strip()

    def number(self, key: str) -> float:
        try:
            return float(self(key))
        except (TypeError, ValueError):
            return float(BY_KEY[key].default)

    def choice(self, key: str) -> str:
        value = str(self(key))
        return value if value in BY_KEY[key].choices else BY_KEY[key].default

    @property
    def policy(self) -> str:
        return self.choice("qrlora_mismatch_policy")

    @property
    def threshold(self) -> float:
        return max(0.0, self.number("qrlora_mismatch_threshold")) / 100.0

    @property
    def default_multiplier(self) -> float:
        return self.number("qrlora_default_multiplier")

    @property
    def hashes_in_infotext(self) -> bool:
        return bool(self("qrlora_add_hashes_to_infotext"))

    @property
    def basis_device(self) -> str:
        return self.choice("qrlora_basis_device")
