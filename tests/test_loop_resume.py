"""Resume where it matters: from a periodic state saved mid-run, with a cosine schedule,
warmup, dropout and gradient accumulation, and the default fp16 save precision; resuming
with other network settings, or over another run's final file, is refused with a sentence."""

import json
import os

import pytest
import torch

from qrlora import deltar
from tests.test_trainer_e2e import write_config
from trainer.cli import main

HARD = ("lr_scheduler = \"cosine\"\nlr_warmup_steps = 2\ngradient_accumulation_steps = 2\n"
        "cpu_threads = 1")
NETWORK = 'type = "qrlora"\nrank = 4\ndropout = 0.3'


def test_resume_from_a_periodic_state_equals_the_uninterrupted_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # save_precision is left at its default (fp16): the round trip users get
    saving = "save_every_n_steps = 3"
    cfg_a = write_config(str(a), steps=7, extra=HARD, network=NETWORK, saving=saving, precision=None)
    assert main(["--config", cfg_a]) == 0
    straight = deltar.load(str(a / "out" / "dog.safetensors"))
    assert straight.metadata["ss_steps"] == "7"

    # the same run, resumed from its step-3 state (6 batches per epoch, 2 per step: the
    # state is taken at the end of epoch 1, before epoch 2's new order)
    cfg_b = write_config(str(b), steps=7, extra=HARD, network=NETWORK, saving=saving, precision=None)
    assert main(["--config", cfg_b, "--set", "training.learning_rate=2e-3"]) == 0
    state = b / "out" / "dog-step000003-state"
    progress = json.load(open(state / "progress.json"))
    assert (progress["step"], progress["epoch"], progress["batches_done"]) == (3, 1, 6)
    run = json.load(open(state / "run.json"))
    assert run["overrides"] == ["training.learning_rate=2e-3"]
    assert run["output_dir"] == str(b / "out") and run["config"]["network"]["dropout"] == 0.3
    assert (state / "scaler.pt").exists() and "torch" in torch.load(state / "rng.pt", weights_only=True)
    os.remove(b / "out" / "dog.safetensors")
    assert main(["--config", cfg_b, "--set", f"saving.resume={state}"]) == 0
    resumed = deltar.load(str(b / "out" / "dog.safetensors"))
    assert resumed.metadata["ss_steps"] == "7"
    assert str(resumed.layers[straight.names[0]].dtype) == "torch.float32"  # loaded back from fp16
    moved = max(float(t.abs().max()) for t in straight.layers.values())
    assert moved > 1e-4
    for name in straight.names:
        assert torch.equal(resumed.layers[name], straight.layers[name]), name


def test_resume_with_another_rank_names_both_sides(tmp_path, capsys):
    cfg = write_config(str(tmp_path), steps=2, extra="cpu_threads = 1")
    assert main(["--config", cfg]) == 0
    state = str(tmp_path / "out" / "dog-state")
    capsys.readouterr()
    assert main(["--config", cfg, "--set", f"saving.resume={state}", "--set", "network.rank=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "network.rank = 4" in err and "network.rank = 2" in err and state in err


def test_resume_never_overwrites_another_runs_final_file(tmp_path, capsys):
    cfg = write_config(str(tmp_path), steps=4, extra="cpu_threads = 1", saving="save_every_n_steps = 2")
    assert main(["--config", cfg]) == 0
    state = str(tmp_path / "out" / "dog-step000002-state")
    # another run (another seed: another session) writes the final file of the same name
    assert main(["--config", cfg, "--set", "training.seed=9", "--set", "saving.save_every_n_steps=3"]) == 0
    other = open(tmp_path / "out" / "dog.safetensors", "rb").read()
    capsys.readouterr()
    assert main(["--config", cfg, "--set", f"saving.resume={state}"]) == 2
    err = capsys.readouterr().err
    assert "final file of another run" in err
    assert open(tmp_path / "out" / "dog.safetensors", "rb").read() == other


@pytest.mark.parametrize("naming,expected", [("qrlora", ["dog-epoch000001", "dog-step000006"]),
                                             ("kohya", ["dog-000001", "dog-step00000006"])])
def test_periodic_save_names(tmp_path, naming, expected):
    # 6 batches per epoch: step 2 and epoch 1 (step 6) are periodic saves; the last step is 8
    cfg = write_config(str(tmp_path), steps=8, extra="cpu_threads = 1",
                       saving=f"save_every_n_steps = 2\nsave_every_n_epochs = 1\nsave_last_n = 2\n"
                              f"save_naming = \"{naming}\"\nsave_state = false")
    assert main(["--config", cfg]) == 0
    names = sorted(f[: -len(".safetensors")] for f in os.listdir(tmp_path / "out")
                   if f.endswith(".safetensors") and f.startswith("dog-"))
    # save_last_n = 2 recognises both namings: steps 2 and 4 are gone, step 6 and epoch 1 stay
    assert names == sorted(expected)
