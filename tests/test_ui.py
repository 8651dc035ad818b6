"""The tools page's handlers (what each button does), on real tiny files, without a browser;
the page itself builds under the installed gradio and registers as the WebUI tab."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora import deltar, export, similarity, tools
from qrlora.basis import load_basis
from qrlora.checkpoint import SafetensorsFile
from qrlora.cli import main
from qrlora.fusion import fuse as core_fuse
from qrlora.official import import_official
from qrlora.ui import handlers as h
from tests.ui_files import make_ui_folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sdxl, single_threaded):
    return make_ui_folder(str(tmp_path_factory.mktemp("ui") / "files"), tiny_sdxl.checkpoint)


def _path(files, name):
    return os.path.join(files.folder, name)


def _expected_fusion(files, pairs):
    return core_fuse([(n, deltar.load(_path(files, n)), w) for n, w in pairs])


def _assert_same_layers(path, expected):
    written = deltar.load(path)
    assert set(written.layers) == set(expected.layers)
    for name, dr in expected.layers.items():
        torch.testing.assert_close(written.layers[name].float(), dr.to(torch.float16).float())


def test_listing_skips_hidden_files_and_sees_subfolders(files, tmp_path):
    os.makedirs(tmp_path / "sub")
    for name in ("a.safetensors", "sub/b.safetensors", ".a.safetensors.x.tmp", "notes.txt", ".hidden.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert h.list_files(str(tmp_path)) == ["a.safetensors", os.path.join("sub", "b.safetensors")]
    assert h.list_files(str(tmp_path / "missing")) == []


def test_inspect_shows_kind_basis_and_size_against_the_lora(files):
    r = h.inspect(files.folder, "dog.safetensors")
    assert not r.error and "delta_r for sdxl" in r.message and "× the size of the same-rank LoRA" in r.message
    assert files.basis.basis_id in r.details and "same-rank standard LoRA" in r.details


def test_fuse_writes_the_core_fusion_and_asks_before_overwriting(files):
    out = _path(files, "fused.safetensors")
    r = h.fuse(files.folder, ["dog.safetensors", "style.safetensors", None, ""], [1.0, 0.5, 1.0, 1.0], "fused")
    assert not r.error and r.written == [out], r.message
    _assert_same_layers(out, _expected_fusion(files, [("dog.safetensors", 1.0), ("style.safetensors", 0.5)]))
    before = open(out, "rb").read()

    asked = h.fuse(files.folder, ["dog.safetensors", "style.safetensors"], [1.0, -0.25], "fused.safetensors")
    assert asked.ask == out and "already exists" in asked.message and "Overwrite" in asked.message
    assert open(out, "rb").read() == before  # nothing written until confirmed
    other = h.fuse(files.folder, ["dog.safetensors", "style.safetensors"], [1.0, -0.25], "fused", confirmed=_path(files, "x.safetensors"))
    assert other.ask == out  # a confirmation for another path does not count
    done = h.fuse(files.folder, ["dog.safetensors", "style.safetensors"], [1.0, -0.25], "fused", confirmed=asked.ask)
    assert not done.error and not done.ask
    _assert_same_layers(out, _expected_fusion(files, [("dog.safetensors", 1.0), ("style.safetensors", -0.25)]))


def test_fuse_refuses_files_on_different_bases_naming_both(files):
    r = h.fuse(files.folder, ["dog.safetensors", "other.safetensors"], [1.0, 1.0], "mixed")
    assert r.error and "dog.safetensors" in r.message and "other.safetensors" in r.message and "different basis" in r.message
    assert "\n" not in r.message and not os.path.exists(_path(files, "mixed.safetensors"))


def test_bad_inputs_are_one_message_and_write_nothing(files, tmp_path):
    gone = _path(files, "gone.safetensors")
    with open(_path(files, "dog.safetensors"), "rb") as f, open(gone, "wb") as g:
        g.write(f.read())
    assert "gone.safetensors" in h.list_files(files.folder)
    os.remove(gone)  # deleted between the listing and the click
    r = h.fuse(files.folder, ["gone.safetensors"], [1.0], "from-gone")
    assert r.error and "gone.safetensors is no longer in" in r.message and "Refresh" in r.message
    assert not os.path.exists(_path(files, "from-gone.safetensors"))
    for result, words in (
        (h.fuse(files.folder, [None, None], [1, 1], "x"), "at least one ΔR file"),
        (h.fuse(files.folder, ["dog.safetensors"], [1], ""), "output file"),
        (h.fuse(files.folder, ["dog.safetensors"], [1], "dog"), "is one of the inputs"),
        (h.inspect(files.folder, "gone.safetensors"), "no longer in"),
        (h.export(files.folder, "dog.safetensors", "kohya", "", "", "lora"), "give the basis"),
        (h.export(files.folder, "dog.safetensors", "kohya", "basis-r4.safetensors", files.checkpoint, "lora"), "not both"),
        (h.export(files.folder, "other.safetensors", "kohya", "basis-r4.safetensors", "", "lora"), "rank"),
        (h.import_official(files.folder, "official.safetensors", "", "", "imp"), "needs the basis"),
        (h.similarity(files.folder, "dog.safetensors", "other.safetensors"), "other.safetensors"),
        (h.compute_basis(str(tmp_path / "none.safetensors"), 4, "", files.folder, "b"), "does not exist"),
        (h.compute_basis(files.checkpoint, 2.5, "", files.folder, "b"), "whole number"),
    ):
        assert result.error and words in result.message and "Traceback" not in result.message, (words, result.message)
    assert not os.path.exists(_path(files, "lora.safetensors")) and not os.path.exists(_path(files, "b.safetensors"))


def test_an_unexpected_exception_is_one_line_and_its_traceback_goes_to_the_console(files, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("disk controller on fire\nsecond line")

    monkeypatch.setattr(tools, "fuse_files", broken)
    r = h.fuse(files.folder, ["dog.safetensors"], [1.0], "never")
    assert r.error and r.message == "internal error: RuntimeError: disk controller on fire"
    err = capsys.readouterr().err
    assert "Traceback" in err and "disk controller on fire" in err and "fuse failed" in err


def test_export_writes_what_the_core_exports(files):
    out = _path(files, "dog-kohya.safetensors")
    r = h.export(files.folder, "dog.safetensors", "kohya", "basis-r4.safetensors", "", "dog-kohya")
    assert not r.error and r.written == [out], r.message
    d = deltar.load(_path(files, "dog.safetensors"))
    expected, _ = export.to_kohya(d, files.basis.q, torch.float16)
    written = load_file(out)
    assert set(written) == set(expected)
    for k in expected:
        torch.testing.assert_close(written[k], expected[k])
    # from the base checkpoint: the basis comes from the cache, and the page says so
    r = h.export(files.folder, "dog.safetensors", "diffusers", "", files.checkpoint, "dog-diffusers", cache=files.cache)
    assert not r.error and "from cache" in r.details, r.message
    assert any(k.endswith(".lora_A.weight") for k in SafetensorsFile(_path(files, "dog-diffusers.safetensors")).keys)


def test_import_official_writes_the_core_import(files):
    r = h.import_official(files.folder, "official.safetensors", "basis-r4.safetensors", "", "imported")
    assert not r.error and "layers imported" in r.details, r.message
    expected, _ = import_official(_path(files, "official.safetensors"), files.basis)
    _assert_same_layers(_path(files, "imported.safetensors"), expected)


def test_similarity_gives_the_core_figures_and_a_plot(files):
    r = h.similarity(files.folder, "dog.safetensors", "style.safetensors")
    assert not r.error, r.message
    core = similarity.compare(_path(files, "dog.safetensors"), _path(files, "style.safetensors"))
    assert f"cos(delta_r) mean {core['summary']['delta_r']['mean']:.4f}" in r.message
    assert r.image.startswith(b"\x89PNG")


def test_basis_compute_with_progress_and_check(files, tmp_path):
    seen = []
    r = h.compute_basis(files.checkpoint, 4, "", str(tmp_path), "computed", cache=str(tmp_path / "cache"),
                        progress=lambda done, total, current: seen.append((done, total)))
    assert not r.error, r.message
    assert seen and seen[-1][0] == seen[-1][1] == len(files.basis.targets)
    assert load_basis(str(tmp_path / "computed.safetensors")).basis_id == files.basis.basis_id
    asked = h.compute_basis(files.checkpoint, 4, "", str(tmp_path), "computed")
    assert asked.ask and "already exists" in asked.message

    ok = h.check_basis(files.folder, "basis-r4.safetensors", files.checkpoint, cache=files.cache)
    assert not ok.error and ok.message.startswith("match: ") and files.basis.basis_id in ok.message
    # a basis file whose Q was altered after it was written
    tensors = load_file(_path(files, "basis-r4.safetensors"))
    first = f"{files.basis.targets[0].name}.q"
    tensors[first] = -tensors[first]
    save_file(tensors, str(tmp_path / "altered.safetensors"), SafetensorsFile(_path(files, "basis-r4.safetensors")).metadata)
    bad = h.check_basis(str(tmp_path), "altered.safetensors", files.checkpoint, cache=files.cache)
    assert bad.message.startswith("no match: ") and "damaged or altered" in bad.message


def test_the_command_line_and_the_core_never_import_gradio():
    code = ("import sys, qrlora, qrlora.cli, qrlora.tools, qrlora.ui, qrlora.ui.handlers; "
            "sys.exit('gradio' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_ui_command_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["ui", "--dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_page_builds_and_registers_as_the_webui_tab(files):
    from qrlora.ui.layout import import_gradio
    from qrlora_ext import tools_tab

    gr = import_gradio()  # the test extra installs gradio 4

    registered = []

    class Callbacks:  # modules/script_callbacks.on_ui_tabs: the callback returns (Blocks, title, elem_id)
        @staticmethod
        def on_ui_tabs(callback, *, name=None):
            registered.append(callback)

    tools_tab.register(Callbacks, lambda: files.folder, lambda: files.cache, print)
    [(page, title, elem_id)] = registered[0]()
    assert isinstance(page, gr.Blocks) and title == "QR-LoRA" and elem_id == "qrlora_tools"
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert {"qrlora_fuse_run", "qrlora_fuse_overwrite", "qrlora_export_run", "qrlora_import_run", "qrlora_sim_run",
            "qrlora_basis_run", "qrlora_check_run", "qrlora_inspect_run"} <= ids
