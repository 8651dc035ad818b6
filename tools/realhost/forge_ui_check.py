"""Check the extension in the real Forge with its UI, on the full-size fp8 FLUX.1-dev (CPU, offline).

    /tmp/realhost/work/check-venv/bin/python tools/realhost/forge_ui_check.py \\
        --work /tmp/realhost/forge --screenshots docs/img

Needs what ``forge_setup.py`` prepared (Forge in ``WORK/webui``, its venv, the fp8 single file,
``flux-dog`` in ``models/QRLoRA`` and its basis file) and runs under the A1111 setup's check venv
(Playwright + Pillow), driving Debian's chromium. It starts Forge with its UI (the flags of
``forge_check.py`` without ``--nowebui``, plus ``--api``, asked when Forge is ready) on a fresh
settings file with the "flux" UI preset, writes everything under ``WORK/run-ui`` (``forge_check.py``'s
``WORK/run`` is left alone), and stops Forge by killing its process group.

The checks, cheapest first so that a slow machine still records the early ones:

- start: Forge serves its UI page;
- card: the Extra Networks "QR-LoRA" tab shows the flux-dog card, clicking it inserts the tag;
- editor-save: the card's metadata editor saves a default λ, which the card then inserts;
- settings-save, settings-reload: our settings section saves a value that a reloaded page shows;
- tools-inspect: the "QR-LoRA" tab inspects flux-dog: arch flux, the basis id of the basis file;
- paste: a pasted parameters text with the tag restores the tag and the steps (no generation);
- generate: one UI generation with ``<qrlora:flux-dog:1>``; the infotext has ``QR-LoRA hashes``;
  paste-renamed: that infotext with the tag renamed pastes back as flux-dog (by hash);
- xyz-lambda: the X/Y/Z plot with the "QR-LoRA λ" axis (0, 1) renders a grid whose λ = 1 cell is
  the generate step's image; the λ = 0 cell is compared with ``forge_check.py``'s untagged image
  when that exists (recorded, not required: the API run may use another schedule).

PASS/FAIL lines, ``WORK/run-ui/results.json``, ``results.md`` and ``forge.log``; exit status 0 iff
every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

# this folder is on sys.path: the file runs as a script
from a1111_check import UI, Results, WebUI, open_page, write_report
from a1111_page import choose, exact, gallery_images, pixel_difference
from a1111_xyz import GridSteps
from PIL import Image

NAME = "flux-dog"  # forge_setup.DELTA_NAME (not imported: forge_setup needs torch, this venv has none)
PROMPT = "a photo of a dog"
TAG = f"<qrlora:{NAME}:1>"
CARD_WEIGHT = 0.7
SETTING_WEIGHT = 0.9
# forge_check.py's generation: 64x64, one Euler step, CFG 1 with distilled CFG 3.5, seed 1234
GEN = {"width": 64, "height": 64, "steps": 1, "cfg_scale": 1, "distilled_cfg_scale": 3.5, "seed": 1234}
GENERATION_TIMEOUT_MS = 1_800_000  # the first generation loads the 16 GiB model: minutes on a busy CPU


class Forge(WebUI):
    """The Forge process with its UI: the A1111 check's process handling (``stop``, ``console``,
    ``get``) with Forge's own folders, settings and command line."""

    def __init__(self, work: str, port: int):
        self.work = work
        self.webui = os.path.join(work, "webui")
        self.run_dir = os.path.join(work, "run-ui")
        self.log_path = os.path.join(self.run_dir, "forge.log")
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.proc: subprocess.Popen | None = None

    def fresh_state(self) -> None:
        """A fresh settings file (flux preset, no live previews), no card file left by an earlier
        run, and the basis file in the basis folder (``forge_check.py`` takes it out for a step)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        os.makedirs(self.run_dir)
        with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"live_previews_enable": False, "show_progress_every_n_steps": -1, "forge_preset": "flux"}, f)
        card_file = os.path.join(self.webui, "models", "QRLoRA", f"{NAME}.json")
        if os.path.exists(card_file):
            os.remove(card_file)
        basis_dir = os.path.join(self.webui, "models", "QRLoRA-basis")
        if not os.path.isdir(basis_dir) or not any(n.endswith(".safetensors") for n in os.listdir(basis_dir)):
            raise SystemExit(f"no basis file in {basis_dir}: run forge_setup.py (or forge_check.py, which puts it back)")

    def basis_id(self) -> str:
        """The id of the one basis file in the basis folder (forge_setup names it ``<basis id>.safetensors``)."""
        names = [n for n in os.listdir(os.path.join(self.webui, "models", "QRLoRA-basis")) if n.endswith(".safetensors")]
        return names[0][: -len(".safetensors")] if len(names) == 1 else f"one of {names}"

    def start(self) -> float:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HOME=os.path.join(self.run_dir, "hf"))
        env.pop("QRLORA_DUMP_DIR", None)  # the weight-dump extension stays inactive
        cmd = [os.path.join(self.work, "venv", "bin", "python"), "launch.py", "--skip-prepare-environment",
               "--always-cpu", "--skip-torch-cuda-test", "--skip-version-check", "--no-hashing", "--api",
               "--port", str(self.port), "--ui-settings-file", os.path.join(self.run_dir, "config.json"),
               "--ckpt", "models/Stable-diffusion/flux1-dev-rand-fp8.safetensors"]
        # no request before "Startup time:" (see WebUI.start)
        return self.launch(cmd, env, 900, ("Startup time:",), "/sdapi/v1/samplers", "Forge")


class ForgeUI(UI):
    """``a1111_check.UI``'s page helpers (tabs, prompt, screenshots, settings, paste) with the
    Forge steps: the flux-dog card, FLUX's generation fields, longer waits."""

    card_name, tag, shot_prefix, wait_ms = NAME, TAG, "forge", 120_000
    generation, generation_fields = GEN, ("width", "height", "steps", "cfg_scale", "distilled_cfg_scale")
    generation_timeout_ms, generation_polling = GENERATION_TIMEOUT_MS, 2000

    def check_editor(self) -> None:
        card = self.open_cards()
        card.hover()
        card.locator(".edit-button").click()
        editor = self.page.locator("#txt2img_qr-lora_edit_user_metadata")
        editor.wait_for(state="visible", timeout=120_000)
        slider = editor.locator(".gradio-slider", has_text="Default λ for this card").locator("input[type=number]")
        slider.fill(str(CARD_WEIGHT))
        slider.press("Enter")
        shot = self.screenshot(editor, "forge-card-editor.png")
        editor.get_by_role("button", name="Save").click()
        weight = self.saved_card_weight()
        self.page.keyboard.press("Escape")
        self.set_prompt("")
        self.page.wait_for_timeout(1000)
        self.open_cards().locator(".name").click()
        prompt = self.prompt()
        self.results.record("editor-save", weight == CARD_WEIGHT and f"<qrlora:{NAME}:{CARD_WEIGHT}>" in prompt,
                            f"{NAME}.json 'preferred weight' = {weight}; the card then inserts {prompt.strip()!r}; "
                            f"screenshot {shot}")
        self.set_prompt("")

    def top_tab(self, name: str) -> None:
        # Forge's top tabs are capitalised ("Txt2img")
        pattern = re.compile(rf"^\s*{re.escape(name)}\s*$", re.IGNORECASE)
        self.page.locator("#tabs > div > button", has_text=pattern).click()

    def check_settings(self) -> None:
        """``UI.check_settings``'s steps, read back from the settings file: Forge's
        ``GET /sdapi/v1/options`` leaves out every extension's options (the built-in Lora's too),
        its response model being made before extensions add theirs."""
        self.top_tab("Settings")
        sidebar = self.page.locator("#settings > div > button", has_text=exact("QR-LoRA"))
        sidebar.wait_for(timeout=60_000)
        sidebar.click()
        field = self.page.locator("#setting_qrlora_default_multiplier input[type=number]")
        field.wait_for(state="visible", timeout=60_000)
        before = field.input_value()
        field.fill(str(SETTING_WEIGHT))
        field.press("Enter")
        shot = self.screenshot(self.page.locator("#tab_settings"), "forge-settings.png", 700)
        self.page.click("#settings_submit")
        self.page.wait_for_function("() => /settings changed|Nothing/.test(gradioApp().querySelector("
                                    "'#settings_result').innerText)", timeout=120_000)
        result = self.page.inner_text("#settings_result").strip()
        with open(os.path.join(self.webui.run_dir, "config.json"), encoding="utf-8") as f:
            stored = json.load(f).get("qrlora_default_multiplier")
        self.results.record("settings-save", float(before) != SETTING_WEIGHT and stored == SETTING_WEIGHT,
                            f"Settings > QR-LoRA, default λ {before} -> {SETTING_WEIGHT}, Apply settings: "
                            f"{result[:60]!r}; config.json has {stored}; screenshot {shot}")

    def check_settings_reload(self) -> None:
        """After Apply settings (``UI.check_settings``), a reloaded page shows the saved value."""
        self.page.reload(timeout=300_000)
        self.page.wait_for_selector("#txt2img_prompt textarea", timeout=300_000)
        self.top_tab("Settings")
        self.page.locator("#settings > div > button", has_text=exact("QR-LoRA")).click()
        field = self.page.locator("#setting_qrlora_default_multiplier input[type=number]")
        field.wait_for(state="visible", timeout=60_000)
        shown = field.input_value()
        self.results.record("settings-reload", float(shown) == SETTING_WEIGHT,
                            f"after reloading the page, Settings > QR-LoRA shows default λ {shown}")

    def check_inspect(self) -> None:
        self.top_tab("QR-LoRA")
        self.page.locator("#tab_qrlora_tools .tab-nav button", has_text=exact("Inspect")).click()
        choose(self.page.locator("#qrlora_inspect_file"), f"{NAME}.safetensors")
        value = "(el) => el.querySelector('textarea, input').value"
        status_box = self.page.locator("#qrlora_inspect_status")
        before = status_box.evaluate(value)
        self.page.click("#qrlora_inspect_run")
        self.page.wait_for_function(
            "(before) => { const el = gradioApp().querySelector('#qrlora_inspect_status textarea, "
            "#qrlora_inspect_status input'); return el && el.value && el.value !== before; }",
            arg=before, timeout=300_000)
        status = status_box.evaluate(value)
        details = self.page.locator("#qrlora_inspect_details").evaluate(value)
        shot = self.screenshot(self.page.locator("#tab_qrlora_tools"), "forge-tools-inspect.png", 700)
        basis_id = self.webui.basis_id()
        arch = next((line.strip() for line in details.splitlines() if re.search(r"\barch", line, re.IGNORECASE)), "")
        basis = next((line.strip() for line in details.splitlines() if "basis" in line.lower()), "")
        self.results.record("tools-inspect", re.search(r"\bfor flux\b", status) is not None and basis_id in details,
                            f"QR-LoRA tab, Inspect {NAME}.safetensors: {status!r}; details say {arch!r}, {basis!r}; "
                            f"basis file in models/QRLoRA-basis: {basis_id}; screenshot {shot}")

    def check_paste_text(self) -> None:
        text = (f"{PROMPT} <qrlora:{NAME}:{CARD_WEIGHT}>\nSteps: {GEN['steps']}, Sampler: Euler, "
                f"Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: {GEN['seed']}, Size: 64x64")
        restored = self.paste(text)
        steps = self.page.input_value("#txt2img_steps input[type=number]")
        self.results.record("paste", restored.strip() == f"{PROMPT} <qrlora:{NAME}:{CARD_WEIGHT}>"
                            and steps == str(GEN["steps"]),
                            f"pasted a parameters text with the tag and pressed ↙: prompt {restored!r}, steps {steps}")
        self.set_prompt("")

    # ------------------------------------------------------------ generation
    def check_generate(self) -> None:
        self.fill_generation(f"{PROMPT} {TAG}")
        mark = len(self.webui.console())
        info, seconds = self.click_generate()
        image, _ = gallery_images(self.page, "#txt2img_gallery", self.webui.url)[0]
        self.infotext = info
        self.images["tagged"] = image
        hashes = re.search(r'QR-LoRA hashes: "[^"]*"', info)
        said = [line.strip() for line in self.webui.console()[mark:].splitlines() if "QR-LoRA" in line][:4]
        shot = self.screenshot_around([self.page.locator("#txt2img_prompt"), self.page.locator("#txt2img_gallery")],
                                      "forge-generate.png")
        self.results.record("generate", TAG in info and hashes is not None,
                            f"UI Generate '{PROMPT} {TAG}', 64x64, 1 step, seed {GEN['seed']}: {seconds:.1f} s "
                            f"(includes loading the model); infotext "
                            f"{hashes.group(0) if hashes else 'has no QR-LoRA hashes'}; console {said}; screenshot {shot}")

    def check_xyz(self) -> None:
        grid = GridSteps(self, PROMPT, TAG)
        images, seconds, _, shot = grid.run_grid("QR-LoRA λ", ("0", "1"), "forge-xyz-lambda.png")
        cells = images[1:]
        if len(cells) != 2:
            raise RuntimeError(f"the gallery has {len(images)} images, expected the grid and 2 cells")
        tags = [m.group(0) if (m := re.search(r"<qrlora:[^>]*>", info)) else "?" for _, info in cells]
        one = pixel_difference(cells[1][0], self.images["tagged"])[0] if "tagged" in self.images else None
        zero_vs_one = pixel_difference(cells[0][0], cells[1][0])[0]
        api_untagged = os.path.join(self.webui.work, "run", "gen01-untagged.png")
        if os.path.isfile(api_untagged):
            zero = pixel_difference(cells[0][0], Image.open(api_untagged).convert("RGB"))[0]
            untagged = f"λ=0 vs forge_check.py's untagged API image: max difference {zero} (not required)"
        else:
            untagged = "no untagged image to compare λ=0 with"
        self.results.record("xyz-lambda", tags == [f"<qrlora:{NAME}:0>", TAG] and one == 0 and zero_vs_one > 0,
                            f"X/Y/Z plot, X = QR-LoRA λ 0, 1: grid {images[0][0].size[0]}x{images[0][0].size[1]} + "
                            f"2 cells in {seconds:.1f} s; cell tags {tags}; λ=1 vs the generate step's image: max "
                            f"difference {one}; λ=0 vs λ=1: {zero_vs_one}; {untagged}; screenshot {shot}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="the folder forge_setup.py prepared")
    parser.add_argument("--port", type=int, default=7864)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshots", default=None, help="folder for the screenshots (docs/img)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out (e.g. xyz,generate)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    forge = Forge(os.path.abspath(args.work), args.port)
    results, timings = Results(), {}
    forge.fresh_state()
    skip = set(filter(None, args.skip.split(",")))
    try:
        try:
            timings["Forge start (UI)"] = forge.start()
        except RuntimeError as e:
            results.record("start", False, str(e))
            raise
        with sync_playwright() as p:
            browser, page, timings["UI page load"] = open_page(p, args.chromium, forge.url)
            results.record("start", True, f"Forge up with its UI in {timings['Forge start (UI)']:.1f} s, "
                                          f"page usable in {timings['UI page load']:.1f} s")
            ui = ForgeUI(page, forge, results, args.screenshots)
            steps = (("card", ui.check_card), ("editor", ui.check_editor), ("settings", ui.check_settings),
                     ("settings-reload", ui.check_settings_reload), ("tools-inspect", ui.check_inspect),
                     ("paste", ui.check_paste_text), ("generate", ui.check_generate),
                     ("paste-renamed", ui.check_paste_renamed), ("xyz", ui.check_xyz))
            for name, step in steps:
                if name in skip:
                    continue
                begun = time.perf_counter()
                results.guarded(name, step)
                timings[name] = time.perf_counter() - begun
            browser.close()
    finally:
        forge.stop()
        card_file = os.path.join(forge.webui, "models", "QRLoRA", f"{NAME}.json")
        if os.path.exists(card_file):  # leave the setup as forge_check.py expects it
            os.remove(card_file)
        write_report(results, forge, timings)
    return 0 if all(row["ok"] for row in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
