"""What a save leaves on disk: a failed write never loses the run; kohya's metadata
conventions (resolution, hashes, shareable paths); a LoRA baseline that WebUIs file under SDXL."""

import json
import os

from qrlora import deltar
from qrlora.checkpoint import read_header, tensor_data_sha256
from tests.test_trainer_e2e import write_config
from trainer import checkpoint
from trainer.cli import main


def failing_on(monkeypatch, fail_calls):
    """Make the adapter writer raise OSError (disk full) on the given call numbers."""
    real = checkpoint.save_adapter
    calls = {"n": 0}

    def save_adapter(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in fail_calls:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_adapter", save_adapter)


def test_a_failed_save_is_retried_at_the_next_one(tmp_path, monkeypatch, capsys):
    cfg = write_config(str(tmp_path), steps=6, extra="cpu_threads = 1", saving="save_every_n_steps = 2")
    failing_on(monkeypatch, (1,))  # the step-2 save fails once
    assert main(["--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "could not save" in out and "No space left on device" in out and "state in memory" in out
    assert "writing works again" in out
    files = sorted(os.listdir(tmp_path / "out"))
    assert "dog-step000002.safetensors" not in files
    assert "dog-step000004.safetensors" in files and "dog.safetensors" in files


def test_when_the_output_folder_stays_unwritable_the_run_goes_to_a_named_fallback(tmp_path, monkeypatch, capsys):
    cfg = write_config(str(tmp_path), steps=4, extra="cpu_threads = 1", saving="save_every_n_steps = 2")
    real = checkpoint.save_adapter

    def only_fallback(path, *args, **kwargs):
        if str(tmp_path / "out") in path:
            raise OSError(13, "Permission denied")  # every write into the output folder fails
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_adapter", only_fallback)
    assert main(["--config", cfg]) == 2
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("error: could not write"))
    saved = line.split(" saved ", 1)[1].split(".safetensors", 1)[0] + ".safetensors"
    assert os.path.isfile(saved) and not saved.startswith(str(tmp_path))
    assert deltar.load(saved).metadata["ss_steps"] == "4"
    assert os.path.isfile(os.path.join(saved[: -len(".safetensors")] + "-state", "progress.json"))
    assert "Resume with:" in out


def test_metadata_has_the_trained_resolution_kohya_hashes_and_no_absolute_paths(tmp_path):
    cfg = write_config(str(tmp_path), steps=2, extra="cpu_threads = 1")
    assert main(["--config", cfg]) == 0
    path = str(tmp_path / "out" / "dog.safetensors")
    meta = read_header(path)[1]
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_resolution"] == "(64, 64)"
    assert meta["sshs_model_hash"] == tensor_data_sha256(path)
    assert len(meta["sshs_legacy_hash"]) == 8
    for key in ("ss_datasets", "qrlora.trainer_config"):
        assert str(tmp_path) not in meta[key], key
    datasets = json.loads(meta["ss_datasets"])
    assert datasets[0]["subsets"][0]["image_dir"] == "dog"
    assert json.loads(meta["qrlora.trainer_config"])["training"]["output_dir"] == "out"


def test_lora_baseline_is_filed_under_sdxl_and_keeps_its_title(tmp_path):
    cfg = write_config(str(tmp_path), steps=2, extra="cpu_threads = 1", network='type = "lora"\nrank = 2',
                       saving='metadata = { title = "My dog" }')
    assert main(["--config", cfg]) == 0
    path = str(tmp_path / "out" / "dog.safetensors")
    meta = read_header(path)[1]
    # A1111's Lora NetworkOnDisk.detect_version: SDXL iff ss_base_model_version starts with "sdxl_"
    assert meta["ss_base_model_version"].startswith("sdxl_")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "My dog" and meta["ss_output_name"] == "dog"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["sshs_model_hash"] == tensor_data_sha256(path)
