"""How a run stops: Ctrl-C saves a state and prints one line that resumes exactly that run
(exit 130); a bug keeps its traceback (exit 1); the weight fingerprint sees one bit; the CPU
thread count is chosen and printed."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from qrlora import deltar
from tests.test_trainer_e2e import ROOT, write_config
from trainer.cli import main
from trainer.distributed import fingerprint


def test_sigint_saves_a_state_exits_130_and_prints_a_resume_line_that_works(tmp_path):
    folder = tmp_path / "my runs"  # a space: the printed line must quote it
    folder.mkdir()
    cfg = write_config(str(folder), steps=100000, extra="cpu_threads = 1")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", cfg, "--set", "training.learning_rate=1e-3"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if "steps in" in line or time.time() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    resume = next(x for x in text.splitlines() if x.startswith("Resume with: ")).split(": ", 1)[1]
    argv = shlex.split(resume)
    assert argv[:3] == ["python", "-m", "trainer"] and argv[4] == cfg
    assert "training.learning_rate=1e-3" in argv
    state = argv[-1].split("=", 1)[1]
    assert os.path.isfile(os.path.join(state, "progress.json"))
    step = int(open(os.path.join(state, "progress.json")).read().split('"step": ')[1].split(",")[0])
    # the printed line resumes that run (two more steps, then the final file)
    assert main(argv[3:] + ["--set", f"training.max_train_steps={step + 2}"]) == 0
    final = deltar.load(str(folder / "out" / "dog.safetensors"))
    assert final.metadata["ss_steps"] == str(step + 2)


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    from trainer import loop

    cfg = write_config(str(tmp_path), steps=2)

    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop.Trainer, "prepare", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # not turned into "error: ..." with exit 2
        main(["--config", cfg])


def test_an_exception_in_a_step_is_raised_after_the_processes_agree(tmp_path, monkeypatch, capsys):
    cfg = write_config(str(tmp_path), steps=4, extra="cpu_threads = 1", saving="save_every_n_steps = 1")
    monkeypatch.setenv("QRLORA_TEST_POISON", "0:3:error")
    with pytest.raises(RuntimeError, match="at step 3"):
        main(["--config", cfg])
    assert (tmp_path / "out" / "dog-step000002.safetensors").exists()
    assert not (tmp_path / "out" / "dog.safetensors").exists()


def test_the_fingerprint_sees_one_bit_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 8, generator=g), torch.randn(3, 5, generator=g)]
    same = [p.clone() for p in params]
    assert torch.equal(fingerprint(params), fingerprint(same))
    nudged = [p.clone() for p in params]
    nudged[1].view(-1)[7] = torch.nextafter(nudged[1].view(-1)[7], torch.tensor(float("inf")))
    assert not torch.equal(fingerprint(params), fingerprint(nudged))
    swapped = [p.clone() for p in params]
    swapped[0].view(-1)[[0, 1]] = swapped[0].view(-1)[[1, 0]]
    assert not torch.equal(fingerprint(params), fingerprint(swapped))


def test_cpu_threads_auto_is_one_for_the_tiny_model_and_a_setting_overrides_it(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        cfg = write_config(str(tmp_path), steps=1)
        assert main(["--config", cfg]) == 0
        assert "1 CPU thread (auto" in capsys.readouterr().out
        assert torch.get_num_threads() == 1
        assert main(["--config", cfg, "--set", "training.cpu_threads=2"]) == 0
        assert "2 CPU thread(s) (as set)" in capsys.readouterr().out
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
