"""The trainer end to end on the built-in tiny FLUX.1-dev: learns, saves what it trained (the
core applies it to the diffusers transformer and gets the training output back), resumes
exactly, trains the same over two processes, with fp8 storage on the same 16-bit basis, and
writes the metadata FLUX tools read."""

import os
import shutil

import torch

from qrlora import deltar
from qrlora.basis import load_basis
from tests.helpers import launch_two_processes
from tests.test_trainer_e2e import DOG
from trainer.cli import main
from trainer.config import load_config
from trainer.loop import Trainer, batch_generator

# short T5 sequences keep the tiny runs quick; the objective is the same
FLUX = "t5xxl_max_token_length = 16\ntimestep_sampling = \"flux_shift\""


def write_flux_config(folder, steps=6, extra="", network='type = "qrlora"\nrank = 4', saving="", flux=FLUX,
                      model="", precision='save_precision = "fp32"', sampling="", lr="2e-3"):
    images = os.path.join(folder, "dog")
    if not os.path.isdir(images):
        shutil.copytree(DOG, images)
    path = os.path.join(folder, "run.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""
[model]
pretrained = "builtin:tiny-flux"
{model}
[network]
{network}
[training]
output_dir = "out"
output_name = "dog"
seed = 3
max_train_steps = {steps}
learning_rate = {lr}
cpu_threads = 1
{extra}
[flux]
{flux}
[sampling]
{sampling}
[saving]
{precision}
{saving}
[general]
resolution = 64
batch_size = 2
caption_extension = ".txt"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "dog"
  num_repeats = 2
""")
    return path


def fixed_loss(trainer, position=0):
    """The loss on one batch with fixed noise and noise levels (σ = 0.3, 0.7)."""
    from trainer.data import collate

    batch = collate(trainer.data[(1, position)])
    with torch.no_grad():
        if batch["text_outputs"] is not None:
            conds = batch["text_outputs"]
        else:
            conds = trainer.family.encode_prompts(trainer.models, batch["captions"])
        t = torch.tensor([300, 700][: len(batch["captions"])])
        return float(trainer.family.training_loss(trainer.models, batch, conds, batch_generator(0, 0, 0),
                                                  timesteps=t).mean())


def test_training_lowers_the_loss_and_the_saved_delta_r_reproduces_the_training_output(tmp_path, capsys):
    cfg = load_config(write_flux_config(str(tmp_path), steps=30, extra="gradient_checkpointing = true",
                                        lr="1e-2"))
    tr = Trainer(cfg, log=lambda s: None)
    tr.prepare()
    tr.network.remove()
    before = fixed_loss(tr)
    tr.network.apply()
    assert fixed_loss(tr) == before  # ΔR = 0: the adapted transformer is the base one
    assert tr.train() == 0
    adapted = fixed_loss(tr)
    assert adapted < before * 0.95, (before, adapted)

    # the file the user gets, with the basis saved beside it, merged into the plain transformer
    tr.network.remove()
    out = tmp_path / "out"
    d = deltar.load(str(out / "dog.safetensors"))
    basis = load_basis(str(out / f"basis-{d.basis_id}.safetensors"))
    assert d.arch == "flux" and len(d.names) == 30  # flux-official on 2 double + 2 single blocks
    with torch.no_grad():
        for name in d.names:
            module = tr.models.denoiser.get_submodule(name[len("transformer."):])
            module.weight += d.delta_weight(name, basis.q[name])
    assert abs(fixed_loss(tr) - adapted) < 1e-5 * max(1.0, abs(adapted))

    meta = d.metadata
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/qrlora"
    assert (meta["ss_timestep_sampling"], meta["ss_model_prediction_type"], meta["ss_guidance_scale"]) == \
        ("flux_shift", "raw", "3.5")
    assert meta["ss_t5xxl_max_token_length"] == "16"

    # qrlora inspect names the family and its blocks
    from qrlora.cli import main as qrlora_main

    capsys.readouterr()
    assert qrlora_main(["inspect", str(out / "dog.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "delta_r for flux" in text and "double blocks: 2" in text and "single blocks: 2" in text


def test_resume_from_a_periodic_state_with_cosine_warmup_and_dropout_equals_the_uninterrupted_run(tmp_path, capsys):
    hard = 'lr_scheduler = "cosine"\nlr_warmup_steps = 2\ngradient_accumulation_steps = 2'
    network = 'type = "qrlora"\nrank = 4\ndropout = 0.3'
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    saving = "save_every_n_steps = 2"
    assert main(["--config", write_flux_config(str(a), steps=5, extra=hard, network=network, saving=saving)]) == 0
    straight = deltar.load(str(a / "out" / "dog.safetensors"))
    cfg_b = write_flux_config(str(b), steps=5, extra=hard, network=network, saving=saving)
    assert main(["--config", cfg_b, "--set", "training.max_train_steps=5"]) == 0
    os.remove(b / "out" / "dog.safetensors")
    capsys.readouterr()
    assert main(["--config", cfg_b, "--set", f"saving.resume={b / 'out' / 'dog-step000002-state'}"]) == 0
    # it continued from step 2 of 5 (a run that ignored the state would also end equal)
    assert f"resumed from {b / 'out' / 'dog-step000002-state'} at step 2" in capsys.readouterr().out
    resumed = deltar.load(str(b / "out" / "dog.safetensors"))
    assert resumed.metadata["ss_steps"] == "5"
    assert max(float(t.abs().max()) for t in straight.layers.values()) > 1e-4
    for name in straight.names:
        assert torch.equal(resumed.layers[name], straight.layers[name]), name


def test_two_processes_match_one_process_with_accumulation_2(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert main(["--config", write_flux_config(str(one), steps=3, extra="gradient_accumulation_steps = 2")]) == 0
    cfg_two = write_flux_config(str(two), steps=3)
    proc = launch_two_processes(cfg_two)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    a = deltar.load(str(one / "out" / "dog.safetensors"))
    b = deltar.load(str(two / "out" / "dog.safetensors"))
    assert a.metadata["ss_steps"] == b.metadata["ss_steps"] == "3"
    assert max(float(t.abs().max()) for t in a.layers.values()) > 1e-4
    for name in a.names:
        assert torch.allclose(a.layers[name], b.layers[name], atol=1e-5), name


def test_fp8_base_trains_on_the_16_bit_basis(tmp_path):
    plain, fp8 = tmp_path / "plain", tmp_path / "fp8"
    plain.mkdir(), fp8.mkdir()
    assert main(["--config", write_flux_config(str(plain), steps=2)]) == 0
    # its own basis cache: the basis is computed in this run, not read back from the 16-bit run's
    network = f'type = "qrlora"\nrank = 4\nbasis_cache = "{fp8 / "bases"}"'
    cfg = load_config(write_flux_config(str(fp8), steps=4, model="fp8_base = true", network=network))
    tr = Trainer(cfg, log=lambda s: None)
    tr.prepare()
    stored = {m.weight.dtype for n, m in tr.models.denoiser.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")}
    assert stored == {torch.float8_e4m3fn}
    before = fixed_loss(tr)
    assert tr.train() == 0
    assert fixed_loss(tr) != before
    a = deltar.load(str(plain / "out" / "dog.safetensors"))
    b = deltar.load(str(fp8 / "out" / "dog.safetensors"))
    assert a.basis_id == b.basis_id
    qa = load_basis(str(plain / "out" / f"basis-{a.basis_id}.safetensors")).q
    qb = load_basis(str(fp8 / "out" / f"basis-{b.basis_id}.safetensors")).q
    for name in qa:
        assert torch.equal(qa[name], qb[name]), name
    assert max(float(t.abs().max()) for t in b.layers.values()) > 1e-4
    assert os.path.isdir(fp8 / "bases")  # computed (and cached) by the fp8 run itself
