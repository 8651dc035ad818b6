"""The "QR-LoRA" tools tab steps of the real-A1111 check (``a1111_check.py``), driven through the UI:
inspect a file, fuse two files with the λ sliders into a new file (read back with
``a1111_fused_file.py``), and the question before an existing output is replaced.

They run last among the UI steps: they add ``cat`` (a second random ΔR on dog's basis) and the
fused file to ``models/QRLoRA``, which the card checks before them expect to hold only ``dog``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from a1111_page import choose, exact

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OTHER = "cat"  # written by the step itself, on dog's basis
FUSED = "fused-ui"
FILES_WRITTEN = (f"{OTHER}.safetensors", f"{FUSED}.safetensors")  # a1111_check's fresh_state removes them
FP16_TOLERANCE = 2e-3  # the fused file stores ΔR in fp16 (the tab's default, as `qrlora fuse`)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class ToolsTab:
    def __init__(self, ui, python: str):
        """``ui``: a1111_check.UI; ``python``: a Python with this project (the qrlora commands)."""
        self.ui, self.page, self.results, self.python = ui, ui.page, ui.results, python
        self.folder = os.path.join(ui.webui.webui, "models", "QRLoRA")
        self.fused = os.path.join(self.folder, FUSED + ".safetensors")

    # ------------------------------------------------------------ helpers
    def value(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id}").locator("textarea, input").first.input_value()

    def click_and_wait(self, button: str, status: str) -> str:
        """Press ``button`` and wait until the ``status`` box shows a new text; returns it."""
        before = self.value(status)
        self.page.click(f"#{button}")
        self.page.wait_for_function(
            "([id, before]) => { const el = gradioApp().querySelector('#' + id + ' textarea, #' + id + ' input');"
            " return el && el.value && el.value !== before; }", arg=[status, before], timeout=300_000)
        return self.value(status)

    def inner_tab(self, name: str) -> None:
        self.page.locator("#tab_qrlora_tools .tab-nav button", has_text=exact(name)).click()

    def set_slider(self, elem_id: str, value: float) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def read_fused(self, weight: float) -> dict:
        done = subprocess.run([self.python, os.path.join(PROJECT, "tools", "realhost", "a1111_fused_file.py"),
                               self.fused, os.path.join(self.folder, "dog.safetensors") + ":1",
                               os.path.join(self.folder, f"{OTHER}.safetensors") + f":{weight}"],
                              capture_output=True, text=True, cwd=PROJECT)
        if done.returncode != 0:
            raise RuntimeError(f"reading {self.fused} failed: {done.stderr.strip()[-300:]}")
        return json.loads(done.stdout)

    # ------------------------------------------------------------ the steps
    def prepare(self) -> None:
        basis = os.path.join(self.ui.webui.run_dir, "basis.safetensors")
        other = os.path.join(self.folder, f"{OTHER}.safetensors")
        subprocess.run([self.python, os.path.join(PROJECT, "examples", "make_example_delta_r.py"), basis, other,
                        "--seed", "1", "--scale", "0.1"], check=True, capture_output=True, cwd=PROJECT)
        self.ui.top_tab("QR-LoRA")
        self.page.locator("#qrlora_refresh").wait_for(state="visible", timeout=60_000)
        self.page.click("#qrlora_refresh")  # the list was made at start-up, before cat existed
        self.page.wait_for_timeout(2000)

    def check_inspect(self) -> None:
        self.inner_tab("Inspect")
        choose(self.page.locator("#qrlora_inspect_file"), "dog.safetensors")
        status = self.click_and_wait("qrlora_inspect_run", "qrlora_inspect_status")
        details = self.value("qrlora_inspect_details")
        shot = self.ui.screenshot(self.page.locator("#tab_qrlora_tools"), "a1111-tools-inspect.png", 700)
        basis = next((line.strip() for line in details.splitlines() if "basis" in line.lower()), "")
        listed = next(e for e in self.ui.webui.get("/sdapi/v1/qrloras") if e.get("name") == "dog")
        self.results.record("tools-inspect", status.startswith("dog.safetensors: ") and listed["basis_id"] in details,
                            f"QR-LoRA tab, Inspect dog.safetensors: {status!r}; details ({len(details.splitlines())} "
                            f"lines) say {basis!r}; screenshot {shot}")

    def fill_fuse(self, weight: float) -> None:
        self.inner_tab("Fuse")
        choose(self.page.locator("#qrlora_fuse_file0"), "dog.safetensors")
        self.set_slider("qrlora_fuse_weight0", 1.0)
        choose(self.page.locator("#qrlora_fuse_file1"), f"{OTHER}.safetensors")
        self.set_slider("qrlora_fuse_weight1", weight)
        self.page.fill("#qrlora_fuse_output textarea", FUSED)

    def check_fuse(self) -> None:
        if os.path.exists(self.fused):
            os.remove(self.fused)
        self.fill_fuse(0.5)
        status = self.click_and_wait("qrlora_fuse_run", "qrlora_fuse_status")
        if not os.path.isfile(self.fused):
            raise RuntimeError(f"no {self.fused} after Fuse; the page says {status!r}")
        read = self.read_fused(0.5)
        self.results.record(
            "tools-fuse", read["same_basis"] and read["layers"] == read["expected_layers"]
            and read["max_relative_error"] < FP16_TOLERANCE,
            f"Fuse dog.safetensors λ 1 + {OTHER}.safetensors λ 0.5 (slider) -> {FUSED}: {status!r}; the file read back: "
            f"{read['layers']} layers, basis {read['basis_id']}, s·ΔR vs 1·s·ΔR_dog + 0.5·s·ΔR_{OTHER} max relative "
            f"error {read['max_relative_error']:.1e} (fp16), fused_from {read['fused_from']}")

    def check_overwrite(self) -> None:
        before = sha256(self.fused)
        self.set_slider("qrlora_fuse_weight1", -0.5)
        asked = self.click_and_wait("qrlora_fuse_run", "qrlora_fuse_status")
        overwrite = self.page.locator("#qrlora_fuse_overwrite")
        shown = overwrite.is_visible()
        kept = sha256(self.fused) == before
        shot = self.ui.screenshot(self.page.locator("#tab_qrlora_tools"), "a1111-tools-overwrite.png", 700)
        self.results.record("tools-ask", "already exists" in asked and shown and kept,
                            f"Fuse again onto {FUSED}.safetensors: {asked!r}; 'Overwrite' button "
                            f"{'shown' if shown else 'not shown'}; the file {'unchanged' if kept else 'CHANGED'}; "
                            f"screenshot {shot}")
        replaced = self.click_and_wait("qrlora_fuse_overwrite", "qrlora_fuse_status")
        read = self.read_fused(-0.5)
        self.results.record("tools-overwrite", read["max_relative_error"] < FP16_TOLERANCE and sha256(self.fused) != before,
                            f"'Overwrite': {replaced!r}; the file now holds 1·dog − 0.5·{OTHER} (max relative "
                            f"error {read['max_relative_error']:.1e})")


def check_tools_tab(ui, python: str) -> None:
    """Records tools-inspect, tools-fuse, tools-ask, tools-overwrite."""
    tab = ToolsTab(ui, python)
    ui.results.guarded("tools-tab", tab.prepare)
    ui.results.guarded("tools-inspect", tab.check_inspect)
    ui.results.guarded("tools-fuse", tab.check_fuse)
    ui.results.guarded("tools-ask", tab.check_overwrite)
