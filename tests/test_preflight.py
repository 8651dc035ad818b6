"""Before any model is loaded, the trainer checks what the run will need later: folders it
writes, optional packages, sample prompts, and every image (opened and fully decoded). All
problems come in one message, exit 2, in --dry-run too."""

import errno
import os
import sys

import pytest
from PIL import Image

from trainer import images, setup
from trainer import preflight as P
from trainer.cli import main
from trainer.config import load_config

from tests.test_trainer_e2e import write_config


@pytest.fixture
def no_model_load(monkeypatch):
    """A run that gets as far as loading the model has missed the check."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(setup, "load_models", refuse)


def run_both(config, capsys, *extra):
    """(exit code, stderr) of --dry-run and of a real run."""
    results = []
    for dry in (True, False):
        code = main(["--config", config, *extra] + (["--dry-run"] if dry else []))
        results.append((code, capsys.readouterr().err))
    return results


# ----------------------------------------------------------------- folders
def test_output_folder_under_a_file_stops_before_loading(tmp_path, capsys, no_model_load):
    (tmp_path / "blocker").write_text("a file where a folder is expected")
    config = write_config(str(tmp_path))
    for code, err in run_both(config, capsys, "--set", "training.output_dir=blocker/out"):
        assert code == 2
        assert "training.output_dir" in err and "blocker is a file" in err and "Traceback" not in err


def test_a_folder_that_cannot_take_a_file_is_reported_with_the_reason(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(P.os, "fsync", disk_full)
    problem = P.folder_problem("training.output_dir", str(tmp_path / "out"))
    assert problem.startswith("training.output_dir: cannot write in ") and "No space left on device" in problem
    monkeypatch.undo()
    assert P.folder_problem("training.output_dir", str(tmp_path / "out")) is None
    assert os.listdir(tmp_path) == []  # the probe leaves nothing behind, and creates no folder


# ----------------------------------------------------------------- packages
def test_missing_optional_packages_are_named_with_their_install_line(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if TensorBoard were not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = write_config(str(tmp_path), extra='optimizer = "adamw8bit"\n[logging]\nlogging_dir = "logs"')
    for code, err in run_both(config, capsys):
        assert code == 2 and "2 problems" in err
        assert "logging.logging_dir (TensorBoard logging) needs torch.utils.tensorboard" in err
        assert "pip install tensorboard" in err
        assert "training.optimizer = 'adamw8bit' needs bitsandbytes" in err and "pip install bitsandbytes" in err


# ----------------------------------------------------------------- prompts
def test_sample_prompts_that_do_not_parse_stop_before_training(tmp_path, capsys, no_model_load):
    (tmp_path / "prompts.json").write_text('[{"prompt": "a dog"},]')
    config = write_config(str(tmp_path), extra='[sampling]\nprompts = "prompts.json"\nsample_at_first = true')
    for code, err in run_both(config, capsys):
        assert code == 2 and "sampling.prompts" in err and "prompts.json: invalid JSON" in err

    (tmp_path / "prompts.txt").write_text("a dog --ss euler_b --w 64\n")
    for code, err in run_both(config, capsys, "--set", "sampling.prompts=prompts.txt"):
        assert code == 2 and "prompt 1 asks for sampler 'euler_b'" in err


def test_unknown_prompt_options_are_warned_about_up_front(tmp_path, capsys):
    config = write_config(str(tmp_path), extra='[sampling]\nprompts = ["a dog --q 3"]\nsample_at_first = true')
    assert main(["--config", config, "--dry-run"]) == 0
    assert "warning: sample prompt 1: options not understood: --q 3" in capsys.readouterr().out


# ----------------------------------------------------------------- images
def _break_images(folder):
    """A zero-byte image, a truncated one and a text file named like an image."""
    good = (folder / "dog0.png").read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("not an image")
    return [str(folder / n) for n in ("cut.png", "empty.png", "notes.jpg")]


def test_every_bad_image_is_named_in_one_message(tmp_path, capsys, no_model_load):
    config = write_config(str(tmp_path))
    bad = _break_images(tmp_path / "dog")
    for code, err in run_both(config, capsys):
        assert code == 2 and "3 problems" in err and "Traceback" not in err
        for path in bad:
            assert path in err
        assert "empty.png is empty (0 bytes)" in err
        assert "cut.png cannot be decoded, the file is truncated or damaged" in err
        assert "notes.jpg is not an image file PIL can read" in err


def test_decoded_images_are_remembered_until_they_change(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    cache = str(tmp_path / "checks.json")
    decoded = []
    real = images.decode_problem
    monkeypatch.setattr(images, "decode_problem", lambda p: decoded.append(p) or real(p))
    assert images.find_bad_images(paths, cache) == []
    assert images.find_bad_images(paths, cache) == [] and len(decoded) == 3  # nothing decoded again
    with open(paths[1], "r+b") as f:  # damaged in place: size and time change
        f.truncate(40)
    assert [p for p, _ in images.find_bad_images(paths, cache)] == [paths[1]] and decoded[3:] == [paths[1]]


def test_an_image_too_small_for_a_bucket_is_named(tmp_path, capsys, no_model_load):
    config = write_config(str(tmp_path))
    Image.new("RGB", (8, 80), "white").save(tmp_path / "dog" / "thin.png")
    with open(config, encoding="utf-8") as f:
        text = f.read().replace("[general]\n", "[general]\nenable_bucket = true\nbucket_no_upscale = true\n"
                                "bucket_reso_steps = 16\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n")
    with open(config, "w", encoding="utf-8") as f:
        f.write(text)
    for code, err in run_both(config, capsys):
        assert code == 2
        assert str(tmp_path / "dog" / "thin.png") + ": 8x80 is smaller than bucket_reso_steps = 16" in err


def test_a_good_config_passes(tmp_path):
    cfg = load_config(write_config(str(tmp_path)))
    assert P.preflight(cfg) == []
    assert not os.path.exists(tmp_path / "out")  # checking creates no output folder
