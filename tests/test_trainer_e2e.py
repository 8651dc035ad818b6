"""The trainer end to end on the built-in tiny SDXL: learns, saves what it trained, resumes
exactly, survives SIGTERM, and the demo runs."""

import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from qrlora import deltar
from qrlora.basis import load_basis
from trainer.cli import main
from trainer.config import load_config
from trainer.loop import Trainer, batch_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOG = os.path.join(ROOT, "examples", "dog")


def write_config(folder, steps=8, extra="", network='type = "qrlora"\nrank = 4', saving="", repeats=2, batch=2,
                 precision="fp32"):
    """A run on the tiny SDXL; ``precision=None`` leaves save_precision at its default (fp16)."""
    images = os.path.join(folder, "dog")
    if not os.path.isdir(images):
        shutil.copytree(DOG, images)
    path = os.path.join(folder, "run.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""
[model]
pretrained = "builtin:tiny-sdxl"
[network]
{network}
[training]
output_dir = "out"
output_name = "dog"
seed = 3
max_train_steps = {steps}
learning_rate = 2e-3
{extra}
[saving]
{f'save_precision = "{precision}"' if precision else ""}
{saving}
[general]
resolution = 64
batch_size = {batch}
caption_extension = ".txt"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "dog"
  num_repeats = {repeats}
""")
    return path


def fixed_loss(trainer, position=0):
    """The loss on one batch with fixed noise and timesteps (what training should lower)."""
    from trainer.data import collate

    batch = collate(trainer.data[(1, position)])
    with torch.no_grad():
        conds = trainer.family.encode_prompts(trainer.models, batch["captions"])
        t = torch.tensor([300, 700][: len(batch["captions"])])
        return float(trainer.family.training_loss(trainer.models, batch, conds, batch_generator(0, 0, 0),
                                                  timesteps=t).mean())


def test_qrlora_at_init_leaves_the_unet_unchanged_and_training_lowers_the_loss(tmp_path):
    cfg = load_config(write_config(str(tmp_path), steps=40))
    tr = Trainer(cfg, log=lambda s: None)
    tr.prepare()
    tr.network.remove()
    before_out = fixed_loss(tr)
    tr.network.apply()
    assert fixed_loss(tr) == before_out  # ΔR = 0: the adapted UNet is the base UNet
    assert tr.train() == 0
    after = fixed_loss(tr)
    assert after < before_out * 0.95, (before_out, after)


def test_saved_delta_r_applied_by_the_core_reproduces_the_training_output(tmp_path):
    cfg = load_config(write_config(str(tmp_path), steps=6))
    tr = Trainer(cfg, log=lambda s: None)
    tr.prepare()
    assert tr.train() == 0
    adapted = fixed_loss(tr)
    tr.network.remove()
    # Apply the file the user gets, with the basis file saved beside it, onto the plain UNet.
    out = os.path.join(str(tmp_path), "out")
    d = deltar.load(os.path.join(out, "dog.safetensors"))
    basis = load_basis(os.path.join(out, f"basis-{d.basis_id}.safetensors"))
    unet = tr.models.denoiser
    originals = {}
    with torch.no_grad():
        for name in d.names:
            module = unet.get_submodule(name[len("unet."):])
            originals[name] = module.weight.clone()
            module.weight += d.delta_weight(name, basis.q[name])
    merged = fixed_loss(tr)
    assert abs(merged - adapted) < 1e-5 * max(1.0, abs(adapted))
    assert d.metadata["ss_output_name"] == "dog" and d.metadata["ss_steps"] == "6"
    assert "dog" in d.metadata["ss_tag_frequency"]


def test_resume_n_plus_n_equals_2n(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert main(["--config", write_config(str(a), steps=8)]) == 0
    straight = deltar.load(str(a / "out" / "dog.safetensors"))
    cfg_b = write_config(str(b), steps=8, saving="save_every_n_steps = 4")
    assert main(["--config", cfg_b, "--set", "training.max_train_steps=4"]) == 0
    # continue the 4-step run's state to 8 steps (same schedule: max_train_steps is part of it)
    state = str(b / "out" / "dog-state")
    assert main(["--config", cfg_b, "--set", f"saving.resume={state}"]) == 0
    resumed = deltar.load(str(b / "out" / "dog.safetensors"))
    for name in straight.names:
        assert torch.allclose(resumed.layers[name], straight.layers[name], atol=1e-6), name


def test_sigterm_leaves_a_resumable_state(tmp_path):
    cfg = write_config(str(tmp_path), steps=100000)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", cfg], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if "steps in" in line or time.time() > deadline:
            break
    time.sleep(3)  # let it take some steps
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 143, text  # 128 + SIGTERM, as schedulers expect
    assert "SIGTERM: saved" in text and "Resume with:" in text
    states = [p for p in os.listdir(tmp_path / "out") if p.endswith("-state")]
    assert states, text
    state = str(tmp_path / "out" / states[0])
    import json

    progress = json.load(open(os.path.join(state, "progress.json")))
    assert progress["step"] > 0
    # it really continues from there: two more steps, then the final file says so
    tr = Trainer(load_config(cfg, [f"saving.resume={state}", f"training.max_train_steps={progress['step'] + 2}"]),
                 log=lambda s: None)
    tr.prepare()
    assert tr.step == progress["step"]
    assert tr.train() == 0
    final = deltar.load(str(tmp_path / "out" / "dog.safetensors"))
    assert final.metadata["ss_steps"] == str(progress["step"] + 2)


def test_lora_baseline_trains_and_saves_kohya_format(tmp_path):
    cfg = write_config(str(tmp_path), steps=4, network='type = "lora"\nrank = 2')
    assert main(["--config", cfg]) == 0
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "out" / "dog.safetensors"))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert not any(k.endswith(".delta_r") for k in sd)


def test_config_errors_exit_2_with_the_message(tmp_path, capsys):
    cfg = write_config(str(tmp_path), extra="learning_rat = 1e-4")
    assert main(["--config", cfg]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_latent_and_text_caches_are_reused_across_runs(tmp_path):
    cfg = write_config(str(tmp_path), steps=2, extra="cache_latents_to_disk = true\ncache_text_encoder_outputs_to_disk = true")
    logs = []
    for _ in range(2):
        tr = Trainer(load_config(cfg), log=logs.append)
        tr.prepare()
        assert tr.train() == 0
    cached = [line for line in logs if line.startswith("cached latents of")]
    assert cached == ["cached latents of 6 images", "cached latents of 0 images"]
    assert os.path.isdir(tmp_path / "out" / "cache" / "latents")
    assert os.path.isdir(tmp_path / "out" / "cache" / "text")


def test_text_encoder_training_adds_te_layers_with_their_own_lr(tmp_path):
    cfg = load_config(write_config(str(tmp_path), steps=2,
                                   network='type = "qrlora"\nrank = 4\ntrain_text_encoder = true\ntext_encoder_lr = 5e-4'))
    tr = Trainer(cfg, log=lambda s: None)
    tr.prepare()
    assert tr.te_names and all(n.startswith(("te1.", "te2.")) for n in tr.te_names)
    assert [g["lr"] for g in tr.optimizer.param_groups] == [2e-3, 5e-4]
    assert tr.train() == 0
    d = deltar.load(str(tmp_path / "out" / "dog.safetensors"))
    te_layers = [n for n in d.names if n.startswith("te")]
    assert te_layers and any(float(d.layers[n].abs().max()) > 0 for n in te_layers)


def test_nan_loss_stops_and_keeps_the_last_good_save(tmp_path, monkeypatch):
    cfg = load_config(write_config(str(tmp_path), steps=6, saving="save_every_n_steps = 2"))
    logs = []
    tr = Trainer(cfg, log=logs.append)
    tr.prepare()
    real_loss = tr.family.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(tr.family, "training_loss", poisoned)
    assert tr.train() == 1
    assert any("loss is nan at step 4" in line and "last good checkpoint is kept" in line for line in logs)
    out = tmp_path / "out"
    assert (out / "dog-step000002.safetensors").exists()
    assert not (out / "dog.safetensors").exists()  # no final file from a broken run
    d = deltar.load(str(out / "dog-step000002.safetensors"))
    assert all(torch.isfinite(t).all() for t in d.layers.values())


def test_save_last_n_keeps_the_newest_periodic_saves(tmp_path):
    cfg = write_config(str(tmp_path), steps=8, saving="save_every_n_steps = 2\nsave_last_n = 2\nsave_state = false")
    assert main(["--config", cfg]) == 0
    files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors") and not f.startswith("basis"))
    assert files == ["dog-step000004.safetensors", "dog-step000006.safetensors", "dog.safetensors"]
