"""The qrlora command end to end on real (tiny) files."""

import json
import subprocess
import sys

import pytest
import torch

from qrlora import deltar
from qrlora.basis import load_basis
from qrlora.cli import main
from tests.helpers import random_delta_r

RANK = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sdxl):
    """A basis and two ΔR files on it, made through the command line."""
    d = tmp_path_factory.mktemp("cli")
    basis_path = str(d / "basis.safetensors")
    assert main(["basis", tiny_sdxl.checkpoint, "--rank", str(RANK), "-o", basis_path, "--cache", str(d / "cache")]) == 0
    b = load_basis(basis_path)
    for seed, name in ((1, "dog"), (2, "style")):
        f = deltar.from_basis(b, random_delta_r(b, seed=seed), alpha=RANK, mask="triu")
        deltar.save(f, str(d / f"{name}.safetensors"), torch.float32, output_name=name)
    return d, b


def test_basis_command_reports_and_hits_the_cache(workdir, tiny_sdxl, capsys):
    d, b = workdir
    out = str(d / "again.safetensors")
    assert main(["basis", tiny_sdxl.checkpoint, "--rank", str(RANK), "-o", out, "--cache", str(d / "cache")]) == 0
    text = capsys.readouterr().out
    assert f"{b.basis_id}: {len(b.targets)} layers at rank {RANK} (cache hit" in text
    assert load_basis(out).basis_id == b.basis_id


def test_inspect(workdir, capsys):
    d, b = workdir
    assert main(["inspect", str(d / "dog.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "delta_r" and info["arch"] == "sdxl" and info["rank"] == RANK
    assert info["layers"] == len(b.targets) and info["basis_id"] == b.basis_id
    assert info["mask"] == "triu" and info["alpha"] == RANK
    assert info["trainable_parameters"] == sum(RANK * t.shape[1] - RANK * (RANK - 1) // 2 for t in b.targets)
    assert info["metadata"]["ss_output_name"] == "dog"
    assert main(["inspect", str(d / "basis.safetensors")]) == 0
    assert "basis for sdxl" in capsys.readouterr().out
    assert main(["inspect", str(d / "dog.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "same-rank standard LoRA in F32" in text and "trainable parameters" in text


def test_similarity_of_delta_r_equals_similarity_of_the_exported_loras(workdir, capsys):
    """cos(ΔR₁, ΔR₂) = cos(ΔW₁, ΔW₂) because Q is orthonormal; the LoRA route computes cos(ΔW)
    from up/down without forming ΔW. Both must agree layer by layer."""
    d, b = workdir
    for name in ("dog", "style"):
        assert main(["export", str(d / f"{name}.safetensors"), "--to", "kohya", "--basis", str(d / "basis.safetensors"),
                     "-o", str(d / f"{name}_lora.safetensors"), "--dtype", "fp32"]) == 0
    assert main(["similarity", str(d / "dog.safetensors"), str(d / "style.safetensors"), "--json", str(d / "dr.json"),
                 "--plot", str(d / "dr.png")]) == 0
    assert main(["similarity", str(d / "dog_lora.safetensors"), str(d / "style_lora.safetensors"),
                 "--json", str(d / "lora.json")]) == 0
    text = capsys.readouterr().out
    assert "cos(delta_r): mean" in text and "cos(delta_w): mean" in text
    dr = json.load(open(d / "dr.json"))["per_layer"]["delta_r"]
    lora = json.load(open(d / "lora.json"))
    assert set(lora["summary"]) == {"down", "up", "delta_w"}
    assert lora["summary"]["up"]["min"] > 0.999  # the same Q in both files
    assert sorted(round(v, 5) for v in dr.values()) == sorted(round(v, 5) for v in lora["per_layer"]["delta_w"].values())
    assert open(d / "dr.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_export_with_another_basis_measures_and_refuses(workdir, tiny_sdxl, tmp_path, capsys):
    """A basis computed from a bf16 copy of the base is not the training basis: the export
    says by how much, and refuses above the limit."""
    from safetensors.torch import load_file, save_file

    d, b = workdir
    bf16 = str(tmp_path / "bf16.safetensors")
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(tiny_sdxl.checkpoint).items()}, bf16)
    args = ["export", str(d / "dog.safetensors"), "--to", "kohya", "--base", bf16, "--cache", str(tmp_path / "c"),
            "-o", str(tmp_path / "x.safetensors")]
    assert main(args + ["--max-disagreement", "0.01"]) == 2  # percent, as in the WebUI setting
    err = capsys.readouterr().err
    assert f"is not the training basis {b.basis_id}: basis differs by" in err and "--max-disagreement" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(args + ["--max-disagreement", "200"]) == 0  # random tiny weights have near-equal σ: big worst case
    assert "warning: basis" in capsys.readouterr().err


def test_errors_exit_2_with_one_message(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert main(["inspect", str(junk)]) == 2
    assert "junk.safetensors: not a safetensors file" in capsys.readouterr().err
    assert main(["export", str(junk), "--to", "kohya", "-o", str(tmp_path / "o")]) == 2
    assert main(["fuse", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_console_script_and_module_entry(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shared", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("qrlora ")
    out = subprocess.run([sys.executable, "-m", "shared", "make-tiny", "--arch", "flux", "-o", str(tmp_path / "f")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "flux1-tiny.safetensors" in out.stdout and "t5xxl.safetensors" in out.stdout
