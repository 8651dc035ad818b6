"""Check the extension in a real Automatic1111 WebUI with its UI, on a CPU, offline.

    /tmp/realhost/work/check-venv/bin/python tools/realhost/a1111_check.py \\
        --webui /tmp/realhost/a1111 --work /tmp/realhost/work --screenshots docs/img

Needs what ``a1111_setup.py`` prepared (the WebUI's venv, the tiny SDXL, the extension link)
and runs under the setup's check venv (Playwright + Pillow), driving Debian's chromium. It
writes ``models/QRLoRA/dog`` and ``models/Lora/exported`` with this project's current code, starts the WebUI with its UI (``--api`` added, for pixel comparisons)
on 127.0.0.1 with a fresh settings file and an empty basis cache, runs every check, stops the
WebUI, and writes ``WORK/run/results.json`` and ``results.md``. Exit status 0 when every check
passed, 1 otherwise.

The checks (each recorded pass/fail with its evidence):
- card: the QR-LoRA card of Extra Networks inserts ``<qrlora:dog:1>`` into the prompt;
- editor: the card's metadata editor shows a non-empty "Hash:" before any generation, and
  saves a per-card default λ (``dog.json``; the card then inserts that λ);
- settings: the QR-LoRA section sits under a named category, not "Uncategorized", and saves;
- generate: ``<qrlora:dog:1>`` from the UI changes the image and the infotext has "QR-LoRA hashes";
- paste: pasting that infotext restores the tag; pasted with a renamed file's name, the
  hash points the tag at the file;
- restore: through the API, tagged then untagged is bit-identical to the first untagged image,
  and ``<qrlora:dog:1>`` is bit-identical to the exported ``<lora:exported:1>``;
- xyz-lambda, xyz-no-basis-work, xyz-blocks: the built-in X/Y/Z plot script with the "QR-LoRA λ"
  axis (0, 0.5, 1: λ = 0 is the untagged image, λ = 1 the tagged one, the console shows no basis
  computed during the sweep) and the "QR-LoRA block weights" axis (content, style, all picked in
  its dropdown: one cell each, all equal to the plain tag); ``a1111_xyz.py``;
- lbw-prompt, lbw-paste: ``<qrlora:dog:1:lbw=content>`` typed into the prompt gives the sweep's
  content cell, is in the infotext, and pasting the infotext restores it;
- tools-inspect, tools-fuse, tools-ask, tools-overwrite: the "QR-LoRA" tab inspects dog, fuses
  dog (λ 1) and a second file (λ 0.5, set on the slider) into a new file that is read back and
  compared with the sum, then asks before replacing it, and replaces it on "Overwrite";
  ``a1111_tools.py``;
- card-folders: after the basis was cached, the card page offers no basis-cache folders;
- api-list, lambda-0.5, cancel, unknown-name, unet-0, unknown-option, api-refresh: the steps of
  the first (API-only) record, rerun: ``<qrlora:dog:0.5>`` equals ``<lora:exported:0.5>``, the
  negated LoRA cancels the tag, an unknown name, an unknown option or ``unet=0`` leaves the
  image untouched;
- progress: the console's basis progress advances evenly; console: no unexpected error block;
- restart: restarted with the basis cached, nothing is recomputed and the image is the same;
- cli-progress, cli-cache: ``qrlora import-official --base CKPT`` shows even progress, and then
  ``qrlora export --base CKPT`` takes the basis from the cache instead of computing it again;
- cli-metadata: ``import-official`` and ``fuse`` outputs carry ``ss_sd_model_name``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from PIL import Image

# this folder is on sys.path: the file runs as a script
from a1111_cli import check_cli
from a1111_page import exact, pixel_difference, shrink_png
from a1111_tools import FILES_WRITTEN, check_tools_tab
from a1111_xyz import check_grids

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "a photo of a dog"
GEN = {"seed": 1234, "steps": 2, "width": 64, "height": 64, "cfg_scale": 7, "sampler_name": "Euler"}
TAG = "<qrlora:dog:1>"
CARD_WEIGHT = 0.7
SETTING_WEIGHT = 0.9


class Results:
    def __init__(self):
        self.rows: list[dict] = []

    def record(self, check: str, ok: bool, evidence: str) -> bool:
        self.rows.append({"check": check, "ok": bool(ok), "evidence": evidence})
        print(f"[check] {'PASS' if ok else 'FAIL'} {check}: {evidence}", flush=True)
        return ok

    def guarded(self, check: str, fn) -> None:
        """Run one check; an exception is that check's failure, with its message as evidence."""
        try:
            fn()
        except Exception as e:  # a failed step must not hide the others
            self.record(check, False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


# ------------------------------------------------------------------ the WebUI process
class WebUI:
    # what other scripts change (a1111_lab.py: the lab base and the sgm/latent-factor variables)
    checkpoint = "tiny-sdxl.safetensors"  # under models/Stable-diffusion
    extra_env: dict[str, str] | None = None

    def __init__(self, webui: str, work: str, port: int):
        self.webui, self.work, self.port = webui, work, port
        self.run_dir = os.path.join(work, "run")
        self.log_path = os.path.join(self.run_dir, "webui.log")
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def fresh_state(self) -> None:
        """A fresh settings file (live previews off: they would fetch an approximation model) and
        an empty basis cache, so the first tag computes the basis from the checkpoint on disk."""
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump({"live_previews_enable": False, "show_progress_every_n_steps": -1}, f)
        for old in (("QRLoRA", "basis"), ("QRLoRA-basis",)):  # the default before and after c9c926e
            shutil.rmtree(os.path.join(self.webui, "models", *old), ignore_errors=True)
        for leftover in ("QRLoRA/dog.json", "QRLoRA/dog.safetensors", "Lora/exported.safetensors",
                         *(f"QRLoRA/{name}" for name in FILES_WRITTEN)):
            path = os.path.join(self.webui, "models", leftover)
            if os.path.exists(path):
                os.remove(path)

    def write_files(self, python: str) -> None:
        """With this project's code of the day: the basis of the tiny SDXL (rank 4, outside the
        WebUI's cache), ``models/QRLoRA/dog`` (random ΔR, seed 0) and the same adapter exported
        as ``models/Lora/exported``."""
        checkpoint = os.path.join(self.webui, "models", "Stable-diffusion", "tiny-sdxl.safetensors")
        basis = os.path.join(self.run_dir, "basis.safetensors")
        dog = os.path.join(self.webui, "models", "QRLoRA", "dog.safetensors")
        exported = os.path.join(self.webui, "models", "Lora", "exported.safetensors")
        for cmd in (["-m", "qrlora", "basis", checkpoint, "--rank", "4", "-o", basis],
                    [os.path.join(PROJECT, "examples", "make_example_delta_r.py"), basis, dog, "--scale", "0.1"],
                    ["-m", "qrlora", "export", dog, "--to", "kohya", "--basis", basis, "--dtype", "fp32",
                     "-o", exported]):
            done = subprocess.run([python, *cmd], cwd=PROJECT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed: {done.stderr.strip()[-500:]}")
        print(f"[check] wrote {dog} and {exported} on {basis}", flush=True)

    def start(self, log_name: str = "webui.log") -> float:
        self.log_path = os.path.join(self.run_dir, log_name)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=os.path.join(self.work, "hf"),
                   **(self.extra_env or {}))
        cmd = [os.path.join(self.work, "venv", "bin", "python"), "launch.py", "--skip-prepare-environment",
               "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model",
               "--ckpt", "models/Stable-diffusion/" + self.checkpoint, "--use-cpu", "all", "--no-half",
               "--precision", "full", "--disable-nan-check", "--api", "--port", str(self.port),
               "--ui-settings-file", os.path.join(self.run_dir, "config.json")]
        # "Startup time:" comes after the API and its middleware are added: a request before
        # then (gradio serves from "Running on local URL" on) makes Starlette build its stack,
        # and the WebUI's own add_middleware then fails ("Cannot add middleware after an
        # application has started"), which a loaded machine hits
        return self.launch(cmd, env, 600, ("Model loaded in", "Startup time:"), "/sdapi/v1/sd-models", "the WebUI")

    def launch(self, cmd: list[str], env: dict, seconds: int, ready: tuple[str, ...], probe: str, name: str) -> float:
        """Run ``cmd`` in its own session (so that stop() ends it and only it), logging to
        ``log_path``, until the console shows every ``ready`` line and ``probe`` answers;
        returns the seconds taken."""
        print("[check] $ " + " ".join(cmd), flush=True)
        started = time.perf_counter()
        log = open(self.log_path, "wb")  # noqa: SIM115 (the process writes to it until stop())
        self.proc = subprocess.Popen(cmd, cwd=self.webui, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {self.log_path}")
            console = self.console()
            if all(line in console for line in ready):
                try:
                    self.get(probe)
                    return time.perf_counter() - started
                except OSError:
                    pass
            time.sleep(1)
        raise RuntimeError(f"{name} did not start in {seconds} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def console(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.load(r)

    def txt2img(self, prompt: str) -> tuple[Image.Image, str, float]:
        started = time.perf_counter()
        r = self.post("/sdapi/v1/txt2img", {"prompt": prompt, **GEN})
        image = Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB")
        return image, json.loads(r["info"])["infotexts"][0], time.perf_counter() - started


# ------------------------------------------------------------------ the UI, through a browser
class UI:
    # what differs between hosts in the shared steps (the Forge UI check overrides these)
    card_name, tag, shot_prefix, wait_ms = "dog", TAG, "a1111", 60_000
    generation, generation_fields = GEN, ("width", "height", "steps", "cfg_scale")  # what fill_generation types
    generation_timeout_ms, generation_polling = 600_000, "raf"  # click_generate's wait for the new image

    def __init__(self, page, webui: WebUI, results: Results, shots: str | None):
        self.page, self.webui, self.results, self.shots = page, webui, results, shots
        self.infotext = ""
        self.images: dict[str, Image.Image] = {}

    def screenshot(self, locator, name: str, max_height: int | None = None) -> str:
        if not self.shots:
            return ""
        os.makedirs(self.shots, exist_ok=True)
        path = os.path.join(self.shots, name)
        locator.scroll_into_view_if_needed()
        box = locator.bounding_box()  # in the viewport, which is where clip measures too
        if max_height and box and box["height"] > max_height:
            self.page.screenshot(path=path, clip={**box, "height": max_height})
        else:
            locator.screenshot(path=path)
        return f"{name} ({shrink_png(path) // 1000} KB)"

    def screenshot_around(self, locators: list, name: str) -> str:
        """One screenshot of the smallest rectangle holding every locator (e.g. a script's settings
        and the gallery beside them), in page coordinates so that it may exceed the viewport."""
        if not self.shots:
            return ""
        os.makedirs(self.shots, exist_ok=True)
        path = os.path.join(self.shots, name)
        scroll = self.page.evaluate("() => [window.scrollX, window.scrollY]")
        boxes = [loc.bounding_box() for loc in locators]
        left, top = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
        right = max(b["x"] + b["width"] for b in boxes)
        bottom = max(b["y"] + b["height"] for b in boxes)
        self.page.screenshot(path=path, full_page=True, clip={"x": left + scroll[0], "y": top + scroll[1],
                                                               "width": right - left, "height": bottom - top})
        return f"{name} ({shrink_png(path) // 1000} KB)"

    def prompt(self) -> str:
        return self.page.input_value("#txt2img_prompt textarea")

    def set_prompt(self, text: str) -> None:
        self.page.fill("#txt2img_prompt textarea", text)

    def top_tab(self, name: str) -> None:
        self.page.locator("#tabs > div > button", has_text=exact(name)).click()

    def open_cards(self):
        self.top_tab("txt2img")
        self.page.locator("#txt2img_extra_tabs > div > button", has_text=exact("QR-LoRA")).click()
        card = self.page.locator(f'#txt2img_qr-lora_cards .card[data-name="{self.card_name}"]')
        card.wait_for(timeout=self.wait_ms)
        return card

    def check_card(self) -> None:
        card = self.open_cards()
        self.set_prompt("")
        card.locator(".name").click()
        prompt = self.prompt()
        shot = self.screenshot(self.page.locator("#txt2img_extra_tabs"), f"{self.shot_prefix}-card-page.png", 560)
        self.results.record("card", self.tag in prompt,
                            f"prompt after clicking the {self.card_name} card: {prompt!r}; screenshot {shot}")
        self.set_prompt("")

    def check_editor(self) -> None:
        card = self.open_cards()
        card.hover()
        card.locator(".edit-button").click()
        editor = self.page.locator("#txt2img_qr-lora_edit_user_metadata")
        editor.wait_for(state="visible", timeout=60_000)
        self.page.wait_for_function("() => /Hash:/.test(gradioApp().querySelector("
                                    "'#txt2img_qr-lora_edit_user_metadata').innerText)", timeout=60_000)
        text = editor.inner_text()
        shot = self.screenshot(editor, "a1111-card-editor.png")
        shown = re.search(r"Hash:[ \t]*([^\n]*)", text)
        shown_hash = shown.group(1).strip() if shown else ""
        self.results.record("editor-hash", bool(re.fullmatch(r"[0-9a-f]{8,}", shown_hash)),
                            f"'Hash:' in the editor on first opening, before any generation: {shown_hash!r}; "
                            f"screenshot {shot}")
        slider = editor.locator(".gradio-slider", has_text="Default λ for this card").locator("input[type=number]")
        slider.fill(str(CARD_WEIGHT))
        slider.press("Enter")
        editor.get_by_role("button", name="Save").click()
        weight = self.saved_card_weight()
        self.page.keyboard.press("Escape")
        self.set_prompt("")
        self.page.wait_for_timeout(1000)
        card = self.open_cards()
        card.locator(".name").click()
        prompt = self.prompt()
        self.results.record("editor-save", weight == CARD_WEIGHT and f"<qrlora:dog:{CARD_WEIGHT}>" in prompt,
                            f"dog.json 'preferred weight' = {weight}; the card then inserts {prompt.strip()!r}")
        self.set_prompt("")

    def saved_card_weight(self) -> float | None:
        """The 'preferred weight' the card editor's Save wrote into ``<card>.json`` (waiting up
        to half of ``wait_ms`` for the file), or None."""
        saved = os.path.join(self.webui.webui, "models", "QRLoRA", f"{self.card_name}.json")
        deadline = time.monotonic() + self.wait_ms / 2000
        while True:
            if os.path.isfile(saved):
                with open(saved, encoding="utf-8") as f:
                    weight = json.load(f).get("preferred weight")
                if weight is not None or time.monotonic() > deadline:
                    return weight
            elif time.monotonic() > deadline:
                return None
            time.sleep(0.5)

    def check_settings(self) -> None:
        self.top_tab("Settings")
        self.page.locator("#settings > div > button", has_text=exact("QR-LoRA")).wait_for(timeout=60_000)
        self.page.wait_for_function("() => gradioApp().querySelector('#settings .settings-category')", timeout=60_000)
        category = self.page.evaluate("""() => {
            let category = null;
            for (const el of gradioApp().querySelectorAll('#settings > div > *')) {
                if (el.classList.contains('settings-category')) category = el.textContent.trim();
                else if (el.textContent.trim() === 'QR-LoRA') return category;
            }
            return 'not found';
        }""")
        self.page.locator("#settings > div > button", has_text=exact("QR-LoRA")).click()
        section = self.page.locator("#settings_qrlora")
        section.wait_for(state="visible", timeout=30_000)
        shot = self.screenshot(self.page.locator("#tab_settings"), "a1111-settings.png")
        self.results.record("settings-category", category not in (None, "Uncategorized", "not found"),
                            f"the QR-LoRA section's heading in the settings sidebar: {category!r}; screenshot {shot}")
        before = self.webui.get("/sdapi/v1/options").get("qrlora_default_multiplier")
        field = self.page.locator("#setting_qrlora_default_multiplier input[type=number]")
        field.fill(str(SETTING_WEIGHT))
        field.press("Enter")
        self.page.click("#settings_submit")
        self.page.wait_for_function("() => /settings changed|Nothing/.test(gradioApp().querySelector("
                                    "'#settings_result').innerText)", timeout=60_000)
        result = self.page.inner_text("#settings_result").strip()
        with open(os.path.join(self.webui.run_dir, "config.json"), encoding="utf-8") as f:
            stored = json.load(f).get("qrlora_default_multiplier")
        api = self.webui.get("/sdapi/v1/options").get("qrlora_default_multiplier")
        changed = re.match(r"\d+ settings changed", result)
        self.results.record("settings-save", before != SETTING_WEIGHT and stored == api == SETTING_WEIGHT,
                            f"default λ {before} -> {SETTING_WEIGHT} with Apply settings: "
                            f"{changed.group(0) if changed else result[:80]!r}; config.json has {stored}, "
                            f"/sdapi/v1/options {api}")

    def fill_generation(self, prompt: str) -> None:
        """The txt2img tab's Generation page with ``prompt`` and the GEN settings."""
        self.top_tab("txt2img")
        page = self.page
        page.locator("#txt2img_extra_tabs > div > button", has_text=exact("Generation")).click()
        self.set_prompt(prompt)
        for field in self.generation_fields:
            box = page.locator(f"#txt2img_{field} input[type=number]")
            box.fill(str(self.generation[field]))
            box.press("Tab")
        page.fill("#txt2img_seed input", str(self.generation["seed"]))
        page.locator("#txt2img_seed input").press("Tab")

    def click_generate(self) -> tuple[str, float]:
        """Generate, wait for the new infotext under the image; returns it and the seconds taken."""
        page = self.page
        # every image is saved under a new name, so the gallery's first picture changes even when
        # the infotext does not (an X/Y/Z grid's infotext is its first cell's)
        first_image = "() => { const i = gradioApp().querySelector('#txt2img_gallery img'); return i ? i.src : ''; }"
        before = page.evaluate(first_image)
        started = time.perf_counter()
        page.click("#txt2img_generate")
        page.wait_for_function(f"(before) => ({first_image})() !== before && "
                               "/Steps:/.test(gradioApp().querySelector('#html_info_txt2img').innerText)",
                               arg=before, timeout=self.generation_timeout_ms, polling=self.generation_polling)
        return page.inner_text("#html_info_txt2img").strip(), time.perf_counter() - started

    def generate(self, prompt: str) -> tuple[Image.Image, str, float]:
        self.fill_generation(prompt)
        info, seconds = self.click_generate()
        page = self.page
        src = page.locator("#txt2img_gallery img").first.get_attribute("src")
        data = page.request.get(src if src.startswith("http") else self.webui.url + "/" + src.lstrip("/")).body()
        return Image.open(io.BytesIO(data)).convert("RGB"), info, seconds

    def check_generation(self) -> None:
        plain, _, t_plain = self.generate(PROMPT)
        tagged, info, t_tagged = self.generate(f"{PROMPT} {TAG}")
        self.infotext = info
        self.images.update(untagged=plain, tagged=tagged)  # the X/Y/Z and lbw= steps compare with them
        peak, mean = pixel_difference(plain, tagged)
        hashes = re.search(r'QR-LoRA hashes: "[^"]*"', info)
        self.results.record("generate", peak > 0 and hashes is not None,
                            f"UI, {GEN['steps']} steps {GEN['width']}x{GEN['height']} seed {GEN['seed']}: "
                            f"untagged {t_plain:.1f} s, tagged {t_tagged:.1f} s (the first tag: it computes the basis); "
                            f"image differs (max {peak}, mean {mean:.1f}); infotext "
                            f"{hashes.group(0) if hashes else 'has no QR-LoRA hashes'}")

    def paste(self, infotext: str) -> str:
        self.top_tab("txt2img")
        self.set_prompt(infotext)
        self.page.locator("#txt2img_steps input[type=number]").fill("20")
        self.page.click("#paste")
        self.page.wait_for_function("(text) => gradioApp().querySelector('#txt2img_prompt textarea').value !== text",
                                    arg=infotext, timeout=60_000)
        self.page.wait_for_timeout(1000)
        return self.prompt()

    def check_paste(self) -> None:
        if "QR-LoRA hashes" not in self.infotext:
            raise RuntimeError("no infotext with QR-LoRA hashes from the generation step")
        restored = self.paste(self.infotext)
        steps = self.page.input_value("#txt2img_steps input[type=number]")
        self.results.record("paste", restored.strip() == f"{PROMPT} {TAG}" and steps == str(GEN["steps"]),
                            f"prompt {restored!r}, steps {steps} after pasting the infotext")
        self.check_paste_renamed()

    def check_paste_renamed(self) -> None:
        """The generated infotext with the card's name changed to 'olddog' (its hash kept)
        pastes as the card's own tag: the extension finds the file by its hash."""
        if "QR-LoRA hashes" not in self.infotext:
            raise RuntimeError("no infotext with QR-LoRA hashes from the generation step")
        renamed = self.infotext.replace(self.tag, "<qrlora:olddog:1>")
        renamed = re.sub(rf'(QR-LoRA hashes: "[^"]*?)\b{re.escape(self.card_name)}:', r"\1olddog:", renamed)
        restored = self.paste(renamed)
        self.results.record("paste-renamed", self.tag in restored and "olddog" not in restored,
                            f"the infotext naming 'olddog' with {self.card_name}'s hash pastes as {restored!r}")
        self.set_prompt("")

    def check_card_folders(self) -> None:
        """After the basis was computed into the basis cache, the refreshed card page offers
        only folders of ΔR files, not the basis cache."""
        self.open_cards()
        self.page.locator("#txt2img_qr-lora_extra_refresh:visible").click()
        self.page.wait_for_timeout(3000)
        folders = [t.strip() for t in self.page.locator("#txt2img_qr-lora_dirs button").all_inner_texts()]
        cards = self.page.locator("#txt2img_qr-lora_cards .card").evaluate_all("els => els.map(e => e.dataset.name)")
        shot = self.screenshot(self.page.locator("#txt2img_extra_tabs"), "a1111-card-folders.png", 560)
        self.results.record("card-folders", not any("basis" in f for f in folders) and cards == ["dog"],
                            f"after the basis was cached, refreshed page: folder buttons {folders}, "
                            f"cards {cards}; screenshot {shot}")


# ------------------------------------------------------------------ API and console (the CLI steps: a1111_cli.py)
def check_restore(webui: WebUI, results: Results) -> None:
    first, _, t1 = webui.txt2img(PROMPT)
    tagged, info, t2 = webui.txt2img(f"{PROMPT} {TAG}")
    exported, _, t3 = webui.txt2img(f"{PROMPT} <lora:exported:1>")
    after, _, t4 = webui.txt2img(PROMPT)
    changed, _ = pixel_difference(first, tagged)
    same_as_lora, _ = pixel_difference(tagged, exported)
    restored, _ = pixel_difference(first, after)
    results.record("restore", changed > 0 and restored == 0,
                   f"API: untagged, {TAG}, untagged again: the tag changes the image (max {changed}), "
                   f"removing it gives max difference {restored} to the first image "
                   f"({t1:.1f}/{t2:.1f}/{t4:.1f} s)")
    results.record("export-equal", same_as_lora == 0,
                   f"API: {TAG} vs <lora:exported:1>: max difference {same_as_lora} ({t3:.1f} s)")


def check_api_steps(webui: WebUI, results: Results) -> Image.Image:
    """The API steps of the first (API-only) record, rerun: listing, λ = 0.5 against the exported
    LoRA, cancelling with the negated LoRA, unknown names and options, refresh. Returns the
    ``<qrlora:dog:1>`` image for the restart check."""
    listed = webui.get("/sdapi/v1/qrloras")
    dog = next((e for e in listed if e.get("name") == "dog"), None)
    results.record("api-list", dog is not None and dog.get("arch") == "sdxl" and str(dog.get("rank")) == "4",
                   "GET /sdapi/v1/qrloras: " + (f"dog, arch {dog.get('arch')}, rank {dog.get('rank')}, "
                                                f"basis {dog.get('basis_id')}" if dog else f"no dog in {listed!r:.200}"))
    plain, _, _ = webui.txt2img(PROMPT)
    tagged, _, _ = webui.txt2img(f"{PROMPT} {TAG}")

    def same(check: str, a: str, b: Image.Image | str, console: str | None = None) -> None:
        mark = len(webui.console())
        image_a, _, seconds = webui.txt2img(f"{PROMPT} {a}")
        image_b = b if isinstance(b, Image.Image) else webui.txt2img(f"{PROMPT} {b}")[0]
        peak, _ = pixel_difference(image_a, image_b)
        said = console is None or console in webui.console()[mark:]
        named = "the untagged image" if b is plain else ("the <qrlora:dog:1> image" if b is tagged else str(b))
        results.record(check, peak == 0 and said, f"{a} vs {named}: max difference {peak} ({seconds:.1f} s)"
                       + (f"; console {'says' if said else 'lacks'} {console!r}" if console else ""))

    same("lambda-0.5", "<qrlora:dog:0.5>", "<lora:exported:0.5>")
    same("cancel", f"{TAG} <lora:exported:-1>", plain)
    same("unknown-name", "<qrlora:nosuchfile:1>", plain, "no such file")
    same("unet-0", "<qrlora:dog:1:unet=0>", plain, "nothing to apply")
    # an unknown option skips its tag (a mistyped start=/stop= must not apply the tag on every step)
    same("unknown-option", "<qrlora:dog:1:foo=3>", plain, "unknown option foo=3")
    request = urllib.request.Request(webui.url + "/sdapi/v1/refresh-qrloras", b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        results.record("api-refresh", r.status == 200, f"POST /sdapi/v1/refresh-qrloras: {r.status}")
    return tagged


def check_restart(webui: WebUI, results: Results, tagged: Image.Image) -> None:
    """Restarted with the basis in the cache: no basis computation, the same image."""
    webui.stop()
    seconds = webui.start("webui-restart.log")
    image, _, _ = webui.txt2img(f"{PROMPT} {TAG}")
    peak, _ = pixel_difference(image, tagged)
    computed = "computing the rank" in webui.console()
    results.record("restart", peak == 0 and not computed,
                   f"restart ({seconds:.1f} s) with the basis cached: {TAG} max difference {peak} to the first "
                   f"session's image; the console {'computes the basis again' if computed else 'computes no basis'}")


def check_progress(webui: WebUI, results: Results) -> None:
    """The console's basis progress lines ("computing basis D/N layers") advance evenly: no
    step between reports (or from the start, or to the end) is over a quarter of the layers."""
    steps = [(int(d), int(n)) for d, n in re.findall(r"computing basis (\d+)/(\d+) layers", webui.console())]
    lines = [line.strip() for line in webui.console().splitlines() if "QR-LoRA" in line and "basis" in line]
    if not steps:
        results.record("progress", False, "no basis progress in the console: " + " | ".join(lines[:6]))
        return
    total = steps[-1][1]
    done = [0] + [d for d, _ in steps]
    jumps = [b - a for a, b in zip(done, done[1:])]
    even = done[-1] == total and max(jumps) <= total / 4 and all(j >= 0 for j in jumps)
    computed = re.findall(r"basis (\S+) computed in ([\d.]+) s", webui.console())
    results.record("progress", even, f"console progress {', '.join(f'{d}/{n}' for d, n in steps)}"
                   f" (largest step {max(jumps)} of {total}); "
                   + "; ".join(f"{bid} computed in {sec} s" for bid, sec in computed))


# the WebUI's own complaint about a symlinked checkout without an 'origin' remote
KNOWN_CONSOLE_ERRORS = ("Failed reading extension data from Git repository (qrlora)",)


def check_console(webui: WebUI, results: Results) -> None:
    """No error block in the WebUI's console ("*** ..." or a traceback) other than the known one."""
    lines = webui.console().splitlines()
    errors = [line.strip() for line in lines if line.startswith("*** ") or line.startswith("Traceback")]
    unknown = [e for e in errors if not any(k in e for k in KNOWN_CONSOLE_ERRORS)]
    tracebacks = sum(1 for line in lines if "Traceback (most recent call last)" in line)
    results.record("console", not unknown and tracebacks <= len(errors) - len(unknown),
                   f"error blocks in the WebUI console: {errors or 'none'}"
                   + (f"; not expected: {unknown}" if unknown else ""))


# ------------------------------------------------------------------ main
def write_report(results: Results, webui: WebUI, timings: dict) -> None:
    with open(os.path.join(webui.run_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"results": results.rows, "timings": timings}, f, indent=1)
    lines = ["| check | result | evidence |", "|---|---|---|"]
    for row in results.rows:
        evidence = row["evidence"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['check']} | {'pass' if row['ok'] else '**FAIL**'} | {evidence} |")
    lines.append("")
    lines.append("Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    with open(os.path.join(webui.run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def default_qrlora_python() -> str:
    venv = os.path.join(PROJECT, ".venv", "bin", "python")
    return venv if os.path.isfile(venv) else "python3"


def open_page(playwright, chromium: str, url: str):
    """(browser, page, seconds): the WebUI's page in chromium, once it is usable."""
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    started = time.perf_counter()
    page.goto(url + "/", timeout=300_000)
    page.wait_for_selector("#txt2img_prompt textarea", timeout=300_000)
    # the WebUI's JavaScript options arrive after the page: a card clicked before then writes
    # "undefined" (the WebUI's own separator option is the sign they are there)
    page.wait_for_function("() => typeof opts !== 'undefined' && "
                           "opts.extra_networks_add_text_separator !== undefined", timeout=120_000)
    return browser, page, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", required=True, help="the A1111 checkout a1111_setup.py prepared")
    parser.add_argument("--work", required=True, help="the setup's work folder")
    parser.add_argument("--port", type=int, default=7870)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshots", default=None, help="folder for the card page and settings screenshots")
    parser.add_argument("--qrlora-python", default=default_qrlora_python(),
                        help="a Python with this project installed, for the qrlora commands")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    webui = WebUI(os.path.abspath(args.webui), os.path.abspath(args.work), args.port)
    results, timings = Results(), {}
    webui.fresh_state()
    webui.write_files(args.qrlora_python)
    try:
        timings["WebUI start (UI and model)"] = webui.start()
        with sync_playwright() as p:
            browser, page, timings["UI page load"] = open_page(p, args.chromium, webui.url)
            ui = UI(page, webui, results, args.screenshots)
            for name, step in (("card", ui.check_card), ("editor", ui.check_editor),
                               ("settings", ui.check_settings), ("generate", ui.check_generation),
                               ("paste", ui.check_paste), ("grids", lambda: check_grids(ui, PROMPT, TAG)),
                               ("card-folders", ui.check_card_folders),
                               ("tools", lambda: check_tools_tab(ui, args.qrlora_python))):
                results.guarded(name, step)
            browser.close()
        results.guarded("restore", lambda: check_restore(webui, results))
        tagged = []
        results.guarded("api", lambda: tagged.append(check_api_steps(webui, results)))
        check_progress(webui, results)
        check_console(webui, results)
        if tagged:
            results.guarded("restart", lambda: check_restart(webui, results, tagged[0]))
    finally:
        webui.stop()
    check_cli(webui, args.qrlora_python, results)
    write_report(results, webui, timings)
    return 0 if all(row["ok"] for row in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
