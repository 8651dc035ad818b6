"""`qrlora ui` in a real browser: every tool used by clicking, each result checked by reading
the file it wrote. Playwright for Python drives the system's Chromium (``CHROMIUM_PATH``, else
/usr/bin/chromium or /usr/bin/chromium-browser; Playwright's own browser download is never
used). Without them the tests are skipped, except under CI, where they fail.

Run them alone with ``python -m pytest -m browser tests``.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from qrlora import deltar, export, similarity
from qrlora.basis import load_basis
from qrlora.fusion import fuse as core_fuse
from qrlora.official import import_official
from tests.ui_files import make_ui_folder

pytestmark = pytest.mark.browser
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TIMEOUT_MS = 60_000  # a busy 2-core machine; the tiny model's tools take about a second


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI: .ci/run installs Debian's chromium)")
    pytest.skip(reason)


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    chromium = find_chromium()
    if chromium is None:
        _unavailable("no Chromium: set CHROMIUM_PATH or apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # root in CI needs no sandbox
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sdxl, browser):
    """``qrlora ui`` on a free port in a subprocess, on tiny files made in a temporary folder."""
    root = tmp_path_factory.mktemp("ui-browser")
    files = make_ui_folder(str(root / "files"), tiny_sdxl.checkpoint)
    shutil.copy(os.path.join(files.folder, "style.safetensors"), os.path.join(files.folder, "doomed.safetensors"))
    port = _free_port()
    log = open(root / "ui.log", "w+")
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "qrlora", "ui", "--dir", files.folder, "--port", str(port),
                             "--basis-cache", files.cache], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"qrlora ui did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield files, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(server, browser):
    """One page for every test (loading gradio's page costs seconds on a busy machine); each
    test sets every field it uses."""
    files, url = server
    p = browser.new_page(viewport={"width": 1000, "height": 760})
    p.set_default_timeout(RESULT_TIMEOUT_MS)
    p.goto(url)
    p.wait_for_selector("#qrlora_refresh")
    yield p
    p.close()


# ----------------------------------------------------------------- clicking
def tab(p, name):
    p.get_by_role("tab", name=name, exact=True).click()


def choose(p, elem_id, value):
    p.click(f"#{elem_id} input")
    p.locator(f'#{elem_id} ul.options li[aria-label="{value}"]').click()
    p.wait_for_function("([sel, v]) => document.querySelector(sel).value === v", arg=[f"#{elem_id} input", value])


def type_in(p, elem_id, text):
    p.fill(f"#{elem_id} textarea, #{elem_id} input[type=number]", str(text))


def set_slider(p, elem_id, value):
    box = p.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def result_after(p, button_id, status_id):
    """Click and wait for the status box to show a new message; returns it."""
    box = f"#{status_id} textarea"
    before = p.input_value(box)
    p.click(f"#{button_id}")
    p.wait_for_function("([sel, old]) => { const v = document.querySelector(sel).value; return v && v !== old; }",
                        arg=[box, before])
    return p.input_value(box)


def _same_layers(path, expected):
    written = deltar.load(path)
    assert set(written.layers) == set(expected.layers)
    for name, dr in expected.layers.items():
        torch.testing.assert_close(written.layers[name].float(), dr.to(torch.float16).float())


# ----------------------------------------------------------------- the tools
def test_inspect(page, server):
    files, _ = server
    choose(page, "qrlora_inspect_file", "dog.safetensors")
    status = result_after(page, "qrlora_inspect_run", "qrlora_inspect_status")
    assert "delta_r for sdxl" in status and "same-rank LoRA" in status
    assert files.basis.basis_id in page.input_value("#qrlora_inspect_details textarea")


def test_fuse_writes_the_core_fusion_and_asks_before_overwriting(page, server):
    files, _ = server
    out = os.path.join(files.folder, "dog_style.safetensors")
    load = lambda n: deltar.load(os.path.join(files.folder, n))  # noqa: E731
    tab(page, "Fuse")
    choose(page, "qrlora_fuse_file0", "dog.safetensors")
    choose(page, "qrlora_fuse_file1", "style.safetensors")
    set_slider(page, "qrlora_fuse_weight1", 0.5)
    type_in(page, "qrlora_fuse_output", "dog_style")
    status = result_after(page, "qrlora_fuse_run", "qrlora_fuse_status")
    assert status.startswith("fused 2 files") and status.endswith(out), status
    _same_layers(out, core_fuse([("dog", load("dog.safetensors"), 1.0), ("style", load("style.safetensors"), 0.5)]))
    if os.environ.get("QRLORA_UI_SCREENSHOT"):  # the picture in docs/ui.md
        page.screenshot(path=os.environ["QRLORA_UI_SCREENSHOT"], type="jpeg", quality=70, full_page=True)

    before = open(out, "rb").read()
    set_slider(page, "qrlora_fuse_weight1", -0.25)
    status = result_after(page, "qrlora_fuse_run", "qrlora_fuse_status")
    assert "already exists" in status and "nothing was written" in status
    assert page.is_visible("#qrlora_fuse_overwrite") and open(out, "rb").read() == before
    status = result_after(page, "qrlora_fuse_overwrite", "qrlora_fuse_status")
    assert status.startswith("fused 2 files"), status
    _same_layers(out, core_fuse([("dog", load("dog.safetensors"), 1.0), ("style", load("style.safetensors"), -0.25)]))
    page.wait_for_selector("#qrlora_fuse_overwrite", state="hidden")


def test_fuse_across_bases_is_refused_naming_both(page, server):
    files, _ = server
    tab(page, "Fuse")
    choose(page, "qrlora_fuse_file0", "dog.safetensors")
    choose(page, "qrlora_fuse_file1", "other.safetensors")
    type_in(page, "qrlora_fuse_output", "mixed")
    status = result_after(page, "qrlora_fuse_run", "qrlora_fuse_status")
    assert status.startswith("error: cannot fuse") and "dog.safetensors" in status and "other.safetensors" in status
    assert "Traceback" not in status and not os.path.exists(os.path.join(files.folder, "mixed.safetensors"))


def test_a_file_deleted_after_listing_gives_a_message(page, server):
    files, _ = server
    tab(page, "Fuse")
    choose(page, "qrlora_fuse_file0", "doomed.safetensors")
    type_in(page, "qrlora_fuse_output", "from-doomed")
    os.remove(os.path.join(files.folder, "doomed.safetensors"))
    status = result_after(page, "qrlora_fuse_run", "qrlora_fuse_status")
    assert status.startswith("error: ΔR file doomed.safetensors is no longer in"), status
    assert not os.path.exists(os.path.join(files.folder, "from-doomed.safetensors"))
    page.click("#qrlora_refresh")  # the list forgets it
    page.click("#qrlora_fuse_file1 input")
    page.wait_for_selector('#qrlora_fuse_file1 ul.options li[aria-label="style.safetensors"]')
    assert page.locator('#qrlora_fuse_file1 ul.options li[aria-label="doomed.safetensors"]').count() == 0
    page.keyboard.press("Escape")


def test_export(page, server):
    files, _ = server
    tab(page, "Export")
    choose(page, "qrlora_export_file", "dog.safetensors")
    choose(page, "qrlora_export_basis", "basis-r4.safetensors")
    type_in(page, "qrlora_export_output", "dog-lora")
    status = result_after(page, "qrlora_export_run", "qrlora_export_status")
    assert status.startswith("exported") and "kohya" in status, status
    written = load_file(os.path.join(files.folder, "dog-lora.safetensors"))
    expected, _ = export.to_kohya(deltar.load(os.path.join(files.folder, "dog.safetensors")), files.basis.q)
    assert set(written) == set(expected)
    for k in expected:
        torch.testing.assert_close(written[k], expected[k])


def test_import_official(page, server):
    files, _ = server
    tab(page, "Import official")
    choose(page, "qrlora_import_file", "official.safetensors")
    choose(page, "qrlora_import_basis", "basis-r4.safetensors")
    type_in(page, "qrlora_import_output", "imported")
    status = result_after(page, "qrlora_import_run", "qrlora_import_status")
    assert status.startswith("imported official.safetensors"), status
    assert "layers imported" in page.input_value("#qrlora_import_details textarea")
    expected, _ = import_official(os.path.join(files.folder, "official.safetensors"), files.basis)
    _same_layers(os.path.join(files.folder, "imported.safetensors"), expected)


def test_similarity_with_its_plot(page, server):
    files, _ = server
    tab(page, "Similarity")
    choose(page, "qrlora_sim_a", "dog.safetensors")
    choose(page, "qrlora_sim_b", "style.safetensors")
    status = result_after(page, "qrlora_sim_run", "qrlora_sim_status")
    core = similarity.compare(os.path.join(files.folder, "dog.safetensors"), os.path.join(files.folder, "style.safetensors"))
    assert f"cos(delta_r) mean {core['summary']['delta_r']['mean']:.4f}" in status, status
    img = page.locator("#qrlora_sim_plot img")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert img.evaluate("i => i.complete && i.naturalWidth") > 100  # the browser decoded it


def test_basis_compute_and_check(page, server):
    files, _ = server
    tab(page, "Basis")
    type_in(page, "qrlora_basis_checkpoint", files.checkpoint)
    type_in(page, "qrlora_basis_rank", 4)
    type_in(page, "qrlora_basis_output", "computed-r4")
    status = result_after(page, "qrlora_basis_run", "qrlora_basis_status")
    assert status.startswith(files.basis.basis_id), status
    assert load_basis(os.path.join(files.folder, "computed-r4.safetensors")).basis_id == files.basis.basis_id
    page.click("#qrlora_refresh")
    choose(page, "qrlora_check_file", "computed-r4.safetensors")
    status = result_after(page, "qrlora_check_run", "qrlora_basis_status")
    assert status.startswith("match: ") and files.basis.basis_id in status, status
