"""Two processes (accelerate, gloo on CPU) train the same ΔR as one process at the same global
batch, and every rank holds the same ΔR after each step (the loop checks it, and fails
otherwise)."""

import torch

from qrlora import deltar
from tests.helpers import launch_two_processes
from tests.test_trainer_e2e import write_config
from trainer.cli import main


def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    # 6 images x 2 repeats / batch 2 = 6 batches per epoch: even, so both layouts pair the same batches
    cfg_one = write_config(str(one), steps=6, extra="gradient_accumulation_steps = 2")
    assert main(["--config", cfg_one]) == 0
    cfg_two = write_config(str(two), steps=6)
    proc = launch_two_processes(cfg_two)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    a = deltar.load(str(one / "out" / "dog.safetensors"))
    b = deltar.load(str(two / "out" / "dog.safetensors"))
    assert a.metadata["ss_steps"] == b.metadata["ss_steps"] == "6"
    moved = max(float(t.abs().max()) for t in a.layers.values())
    assert moved > 1e-4  # it trained
    for name in a.names:
        assert torch.allclose(a.layers[name], b.layers[name], atol=1e-5), name


def test_a_nan_on_one_rank_stops_both_at_the_same_step_and_keeps_the_last_good_save(tmp_path):
    cfg = write_config(str(tmp_path), steps=6, saving="save_every_n_steps = 2")
    # the test hook (trainer.distributed.POISON_ENV): rank 1's loss is NaN at step 3
    proc = launch_two_processes(cfg, QRLORA_TEST_POISON="1:3")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "loss is nan at step 3 on rank 1; stopping every process" in text, text[-3000:]
    out = tmp_path / "out"
    assert not (out / "dog.safetensors").exists()
    good = deltar.load(str(out / "dog-step000002.safetensors"))
    assert good.metadata["ss_steps"] == "2"
    assert all(torch.isfinite(t).all() for t in good.layers.values())
