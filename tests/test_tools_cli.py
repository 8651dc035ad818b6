"""The qrlora tools say what they compare, and what went wrong, in one line."""

import json
import os
import stat

import pytest
import torch

from qrlora import deltar
from qrlora.basis import load_basis
from qrlora.checkpoint import SafetensorsFile, tensor_data_sha256
from qrlora.cli import build_parser, main
from qrlora.export import kohya_metadata, kohya_state_dict
from qrlora.checkpoint import save_atomic
from qrlora.fusion import IncompatibleFiles, fuse
from tests.helpers import random_delta_r


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sdxl):
    """Bases at ranks 4 and 8, two rank-4 ΔR files and one rank-8 file, written by the CLI's core."""
    d = tmp_path_factory.mktemp("tools")
    out = {}
    for rank in (4, 8):
        out[f"basis{rank}"] = str(d / f"basis{rank}.safetensors")
        assert main(["basis", tiny_sdxl.checkpoint, "--rank", str(rank), "-o", out[f"basis{rank}"]]) == 0
    for name, rank, seed in (("dog", 4, 1), ("style", 4, 2), ("wide", 8, 3)):
        b = load_basis(out[f"basis{rank}"])
        f = deltar.from_basis(b, random_delta_r(b, seed=seed), alpha=rank, mask="triu",
                              metadata={"ss_sd_model_name": "tiny-sdxl.safetensors"})
        out[name] = str(d / f"{name}.safetensors")
        deltar.save(f, out[name], torch.float32, output_name=name)
    out["dir"] = d
    return out


def test_similarity_refuses_delta_r_files_on_different_bases_naming_both(files, capsys):
    assert main(["similarity", files["dog"], files["wide"]]) == 2
    err = capsys.readouterr().err
    assert "dog.safetensors and" in err and "wide.safetensors" in err and "rank 4 vs rank 8" in err
    assert "qrlora export --to kohya" in err and len(err.strip().splitlines()) == 1


def test_similarity_of_a_delta_r_file_and_a_lora_goes_through_delta_w(files, capsys):
    """The trainer's `type = "lora"` baseline is a kohya LoRA of another rank on the same layers:
    it compares with a ΔR file through ΔW. A LoRA holding exactly the ΔR file's ΔW gives 1."""
    d = files["dir"]
    b = load_basis(files["basis4"])
    dog = deltar.load(files["dog"])
    # the same ΔW, factored differently (rank 8 up/down with a random rotation): cos(ΔW) must be 1
    rot, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    ups = {n: torch.cat([b.q[n], torch.zeros_like(b.q[n])], 1) @ rot for n in dog.names}
    downs = {n: rot.T @ torch.cat([dog.layers[n] * dog.scale, torch.zeros_like(dog.layers[n])]) for n in dog.names}
    same = str(d / "same_lora.safetensors")
    save_atomic(kohya_state_dict("sdxl", dog.targets, ups, downs, 1.0 / 8, torch.float32), same, kohya_metadata("sdxl"))
    assert main(["similarity", files["dog"], same]) == 2  # Q is needed
    assert "give the basis: --basis" in capsys.readouterr().err
    assert main(["similarity", files["dog"], same, "--basis", files["basis4"], "--json", str(d / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "a ΔR file and a LoRA, compared through ΔW" in text and "cos(delta_w): mean 1.0000" in text
    result = json.load(open(d / "s.json"))
    assert set(result["summary"]) == {"delta_w"} and result["summary"]["delta_w"]["min"] > 0.9999
    assert result["summary"]["delta_w"]["count"] > 0


def test_inspect_json_keeps_every_value_whole_and_names_a_loras_architecture(files, capsys):
    assert main(["inspect", files["dog"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"] == SafetensorsFile(files["dog"]).metadata  # nothing cut short
    assert len(info["metadata"]["qrlora.layers"]) > 300
    lora = str(files["dir"] / "anon_lora.safetensors")
    b = load_basis(files["basis4"])
    dog = deltar.load(files["dog"])
    save_atomic(kohya_state_dict("sdxl", dog.targets, b.q, dog.layers, 1.0), lora, {})  # no metadata at all
    assert main(["inspect", lora, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "sdxl"  # from the key layout


def test_fuse_says_the_lambda_is_not_a_number(files, tmp_path, capsys):
    assert main(["fuse", f"{files['dog']}:abc", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the λ after the last ':' must be a number, got 'abc'" in err and "dog.safetensors:abc" in err


@pytest.mark.parametrize("command", ["fuse", "export", "similarity-json", "basis"])
def test_an_unwritable_output_is_one_message_exit_2(files, tiny_sdxl, tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = str(blocker / "out.safetensors")  # its parent is a file: unwritable, even for root
    argv = {
        "fuse": ["fuse", files["dog"], "-o", out],
        "export": ["export", files["dog"], "--to", "kohya", "--basis", files["basis4"], "-o", out],
        "similarity-json": ["similarity", files["dog"], files["style"], "--json", out],
        "basis": ["basis", tiny_sdxl.checkpoint, "--rank", "4", "-o", out],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qrlora ") and f"cannot write {out}:" in err[-1]
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_outputs_get_the_umask_permissions_and_kohya_hash(files, tmp_path):
    old = os.umask(0o022)
    try:
        out = str(tmp_path / "f.safetensors")
        assert main(["fuse", files["dog"], files["style"], "-o", out]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    meta = SafetensorsFile(out).metadata
    assert meta["sshs_model_hash"] == tensor_data_sha256(out)  # computed for this file, not carried over
    assert meta["ss_sd_model_name"] == "tiny-sdxl.safetensors"  # the inputs' base model


def test_export_and_import_write_the_hash_and_base_model_name(files, tiny_sdxl, tmp_path):
    out = str(tmp_path / "lora.safetensors")
    assert main(["export", files["dog"], "--to", "kohya", "--base", tiny_sdxl.checkpoint, "-o", out]) == 0
    meta = SafetensorsFile(out).metadata
    assert meta["sshs_model_hash"] == tensor_data_sha256(out) and meta["ss_sd_model_name"] == "tiny-sdxl.safetensors"


def test_export_with_a_basis_of_another_rank_names_both_sides(files, tmp_path, capsys):
    assert main(["export", files["dog"], "--to", "kohya", "--basis", files["basis8"], "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "dog.safetensors has rank 4 but" in err and "basis8.safetensors has rank 8" in err


def test_other_exceptions_keep_their_traceback(files, monkeypatch, tmp_path):
    """Only input errors are one line and exit 2; a bug or out-of-memory must stay visible."""
    import qrlora.fusion

    def broken(items):
        raise RuntimeError("a bug")

    monkeypatch.setattr(qrlora.fusion, "fuse", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["fuse", files["dog"], "-o", str(tmp_path / "x.safetensors")])


def test_every_positional_argument_has_help_and_threads_are_checked(files, tmp_path, capsys):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if not action.option_strings:
                assert action.help, f"qrlora {name} {action.dest}"
    assert main(["fuse", files["dog"], "-o", str(tmp_path / "x.safetensors"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert main(["fuse", files["dog"], "-o", str(tmp_path / "x.safetensors"), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1


def test_fuse_refuses_alpha_0_naming_the_file(files):
    silent = deltar.load(files["style"])
    silent.alpha = 0.0
    with pytest.raises(IncompatibleFiles, match=r"style.safetensors has alpha 0"):
        fuse([("dog.safetensors", deltar.load(files["dog"]), 1.0), ("style.safetensors", silent, 1.0)])
