"""The "QR-LoRA" tab of the WebUI: the tools page of ``qrlora ui`` (``qrlora.ui``), on the
ΔR folder, with the extension's basis folder as the basis cache.

Host interface, the same in A1111 v1.10 (gradio 3.41) and Forge (gradio 4.40):
``modules/script_callbacks.on_ui_tabs(callback)``; ``modules/ui.create_ui`` calls the callback
while it builds the page and adds each ``(gradio Blocks, title, elem_id)`` it returns as a
top-level tab (ordered by the user's ``ui_tab_order`` setting), with the queue enabled, which
progress bars need.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .core import package


def register(script_callbacks, qrlora_dir: Callable[[], str], basis_dir: Callable[[], str], log) -> None:
    if not hasattr(script_callbacks, "on_ui_tabs"):  # a host without tabs (API-only stand-ins)
        return

    def tabs():
        try:
            ui = importlib.import_module(f"{package.__name__}.ui")
            page = ui.build(qrlora_dir, basis_folder=qrlora_dir, cache=basis_dir)
        except Exception as e:  # the tab is optional; the tag must work regardless
            log(f"the QR-LoRA tools tab is unavailable: {e}")
            return []
        return [(page, ui.TAB_TITLE, ui.TAB_ID)]

    script_callbacks.on_ui_tabs(tabs)
