"""What both WebUIs see: settings, the Extra Networks card page, the API, pasting infotext,
install.py and preload.py (in the stand-in hosts)."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from qrlora_ext import settings
from qrlora import deltar
from qrlora.checkpoint import tensor_data_sha256
from tests.helpers import synthetic_basis, synthetic_file
from tests.hosts.harness import ROOT, Host


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    qr = root / "QRLoRA"
    b = synthetic_basis()[0]
    meta = {"ss_tag_frequency": json.dumps({"1_dog": {"dog": 5, "grass": 2}}), "ssmd_cover_images": "[]"}
    deltar.save(synthetic_file(b, seed=1, metadata=meta), str(qr / "dog.safetensors"), output_name="dog")
    deltar.save(synthetic_file(b, seed=2, metadata={"modelspec.trigger_phrase": "wtrclr"}),
                str(qr / "styles" / "watercolor.safetensors"))
    (qr / "dog.png").write_bytes(b"\x89PNG")
    (qr / "dog.txt").write_text("my dog", encoding="utf-8")
    (qr / "styles" / "watercolor.json").write_text(json.dumps({"preferred weight": 0.7, "activation text": "soft"}),
                                                   encoding="utf-8")
    return root


@pytest.fixture(params=["a1111", "forge"])
def host(request, folder):
    h = Host(request.param, str(folder), str(folder / "QRLoRA"))
    yield h
    h.close()


def test_settings_exist_without_the_ui(host):
    from modules import shared

    for s in settings.SETTINGS:
        info = shared.options_templates[s.key]
        assert info.section == ("qrlora", "QR-LoRA") and info.default == s.default
        assert info.category_id == "sd"  # beside Extra Networks in the sidebar, not under "Uncategorized"
        assert getattr(shared.opts, s.key) == s.default  # --nowebui: no settings page was ever built
    assert host.engine.options.policy == "warn" and host.engine.options.threshold == 0.01
    shared.opts.qrlora_mismatch_policy = "nonsense"
    assert host.engine.options.policy == "warn"  # an invalid value falls back to the default


def test_folders_come_from_command_line_then_settings(host, folder, tmp_path):
    from modules import shared

    assert host.engine.library.folders() == [str(folder / "QRLoRA")]
    assert host.engine.basis_folder().endswith(os.path.join("models", "QRLoRA-basis"))  # preload's default
    shared.opts.qrlora_dir = str(tmp_path)
    shared.opts.qrlora_basis_dir = str(tmp_path / "b")
    assert host.engine.library.folders() == [str(tmp_path)] and host.engine.basis_folder() == str(tmp_path / "b")


def test_extra_networks_page(host, folder):
    (page,) = [p for p in host.pages if p.title == "QR-LoRA"]
    assert page.name == "qr-lora"
    items = page.create_html_items()
    assert sorted(items) == ["dog", "styles/watercolor"]
    dog = items["dog"]
    # the card's edit view shows "Hash:" from the first listing (A1111 reads item["shorthash"])
    assert dog["shorthash"] == tensor_data_sha256(str(folder / "QRLoRA" / "dog.safetensors"))[:12]
    assert dog["preview"].endswith("dog.png") and dog["description"] == "my dog"
    assert "dog" in dog["search_terms"] and "grass" in dog["search_terms"]
    assert dog["prompt"] == '"<qrlora:dog:" + opts.qrlora_default_multiplier + ">"'
    assert dog["metadata"]["qrlora.rank"] == "4" and "qrlora.layers" in dog["metadata"]
    assert page.metadata["dog"] is dog["metadata"]  # the metadata viewer's data
    water = items["styles/watercolor"]
    assert water["prompt"] == '"<qrlora:styles/watercolor:" + 0.7 + ">" + " soft"'  # per-card λ, activation text
    assert page.create_item("styles/watercolor", enable_filter=False)["name"] == "styles/watercolor"
    assert page.allowed_directories_for_previews() == [str(folder / "QRLoRA")]
    (folder / "QRLoRA" / "cat.safetensors").write_bytes((folder / "QRLoRA" / "dog.safetensors").read_bytes())
    try:
        page.refresh()
        assert "cat" in page.create_html_items()
    finally:
        (folder / "QRLoRA" / "cat.safetensors").unlink()
        page.refresh()


class App:
    """Stand-in of the FastAPI app passed to ``on_app_started`` (``add_api_route``)."""

    def __init__(self):
        self.routes = {}

    def add_api_route(self, path, endpoint, methods):
        for m in methods:
            self.routes[(m, path)] = endpoint


def test_api(host):
    app = App()
    host.script_callbacks.app_started_callback(None, app)
    listed = app.routes[("GET", "/sdapi/v1/qrloras")]()
    assert sorted(x["name"] for x in listed) == ["dog", "styles/watercolor"]
    json.dumps(listed)
    assert app.routes[("POST", "/sdapi/v1/refresh-qrloras")]() == {"count": 2}


def test_pasting_infotext_finds_renamed_files_by_hash(host, folder):
    from qrlora.checkpoint import tensor_data_sha256

    short = tensor_data_sha256(str(folder / "QRLoRA" / "styles" / "watercolor.safetensors"))[:12]
    params = {"Prompt": "a <qrlora:watercolor_old:0.5> <qrlora:unknown:1>",
              "QR-LoRA hashes": f"watercolor_old: {short}, unknown: 000000000000"}
    host.script_callbacks.infotext_pasted_callback("", params)
    assert params["Prompt"] == "a <qrlora:styles/watercolor:0.5> <qrlora:unknown:1>"


def test_tag_registered_in_before_ui(host):
    assert host.qrlora is not None and host.qrlora.name == "qrlora"


def test_preload_defaults():
    spec_globals = {}
    with open(os.path.join(ROOT, "preload.py"), encoding="utf-8") as f:
        exec(compile(f.read(), "preload.py", "exec"), spec_globals)
    parser = argparse.ArgumentParser()
    spec_globals["preload"](parser)
    args = parser.parse_args([])
    assert args.qrlora_dir == os.path.join("models", "QRLoRA")
    assert args.qrlora_basis_dir == os.path.join("models", "QRLoRA-basis")
    # not a subfolder of the card folder: A1111's Extra Networks page would show the basis cache
    # (and its entries/) as folder buttons, as the real-host check saw
    inside = os.path.relpath(args.qrlora_basis_dir, args.qrlora_dir)
    assert inside.startswith(os.pardir), inside


def test_install_installs_nothing_and_reports_problems():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], capture_output=True, text=True, check=True)
    assert out.stdout == ""  # torch and safetensors are new enough here
    spec_globals = {"__name__": "check"}
    with open(os.path.join(ROOT, "install.py"), encoding="utf-8") as f:
        exec(compile(f.read(), "install.py", "exec"), spec_globals)
    spec_globals["REQUIRED"]["torch"] = (99, 0)
    spec_globals["REQUIRED"]["no-such-package-qrlora"] = (1, 0)
    problems = spec_globals["check"]()
    assert any("torch" in p and "too old" in p for p in problems)
    assert any("no-such-package-qrlora is not installed" in p for p in problems)
