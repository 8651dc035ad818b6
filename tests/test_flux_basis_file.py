"""FLUX when the user has only fp8 transformer weights: the basis comes from a basis file made
once from the 16-bit release (``qrlora basis``), is checked against the loaded model by the
weight projections it records, and a basis the trainer makes records them too, so a Forge user
whose model is quantized finds it by identity."""

from __future__ import annotations

import os
import shlex
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora import deltar
from qrlora.basis import Basis, BasisCache, load_basis
from qrlora.cli import main as qrlora_main
from qrlora.errors import IncompatibleFiles
from tests.test_flux_train import write_flux_config
from trainer.cli import main
from trainer.config import load_config
from trainer.families.flux_tokenizers import tiny_t5_tokenizer
from trainer.loop import Trainer
from trainer.schema import ConfigError

pytestmark = pytest.mark.usefixtures("single_threaded")
RANK = 4


@pytest.fixture(scope="module")
def user_files(tiny_flux, tmp_path_factory):
    """What a FLUX user with little memory has: the transformer in fp8 only, and ae, clip_l,
    t5xxl beside it (the 16-bit transformer is tiny_flux.checkpoint)."""
    root = tmp_path_factory.mktemp("fp8-user")
    fp8 = str(root / "flux1-dev-fp8.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in load_file(tiny_flux.checkpoint).items()},
              fp8)
    t5_tokenizer = str(root / "t5-tokenizer")
    tiny_t5_tokenizer()[0].save_pretrained(t5_tokenizer)
    return {"fp8": fp8, "root": root, "model": {
        "ae": tiny_flux.extra_files["vae"], "clip_l": tiny_flux.extra_files["clip_l"],
        "t5xxl": tiny_flux.extra_files["t5"], "config_dir": tiny_flux.config_dir, "t5_tokenizer": t5_tokenizer}}


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> str:
    """The same model (tiny_flux's weights) as a diffusers pipeline folder: no single file."""
    from qrlora.tiny.flux import build_components

    folder = tmp_path_factory.mktemp("diffusers") / "FLUX.1-tiny"
    for sub, module in build_components(0).items():
        if sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            module.save_pretrained(str(folder / sub))
    tiny_t5_tokenizer()[0].save_pretrained(str(folder / "tokenizer_2"))
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    return str(folder)


def config_on(folder, pretrained: str, model: dict, steps=2, **kw) -> str:
    """The tiny FLUX run of test_flux_train on the user's own files."""
    lines = "\n".join(f"{k} = {str(v)!r}".replace("'", '"') for k, v in model.items())
    path = write_flux_config(str(folder), steps=steps, model=lines, **kw)
    with open(path, encoding="utf-8") as f:
        text = f.read().replace('pretrained = "builtin:tiny-flux"', f'pretrained = "{pretrained}"')
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def make_basis_file(checkpoint: str, output: str, rank=RANK, targets="flux-official") -> Basis:
    assert qrlora_main(["basis", checkpoint, "--rank", str(rank), "--targets", targets, "-o", output]) == 0
    return load_basis(output)


# ----------------------------------------------------------------- fp8-only weights
def test_fp8_only_weights_without_a_basis_stop_naming_the_command_that_makes_it(user_files, tiny_flux, tmp_path,
                                                                                  capsys):
    config = config_on(tmp_path, user_files["fp8"], user_files["model"])
    with pytest.raises(ConfigError):  # before any training: before the model is loaded
        Trainer(load_config(config), log=lambda s: None).prepare()
    output = os.path.join(str(user_files["root"]), f"flux1-dev-fp8-basis-r{RANK}.safetensors")
    command = f"qrlora basis flux1-dev.safetensors --rank {RANK} --targets flux-official -o {output}"
    for dry_run in ([], ["--dry-run"]):  # the plan stops on it too
        capsys.readouterr()
        assert main(["--config", config, *dry_run]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert f"model.pretrained: {user_files['fp8']} stores the FLUX transformer in fp8" in err, err
        assert f"`{command}`" in err and f'model.basis = "{output}"' in err, err
    assert not os.path.exists(tmp_path / "out" / "dog.safetensors")

    # the command, run on the 16-bit release, makes the basis the message says to set; with it the run trains
    argv = shlex.split(command)[1:]
    argv[1] = tiny_flux.checkpoint
    assert qrlora_main(argv) == 0
    with_basis = config_on(tmp_path, user_files["fp8"], user_files["model"] | {"basis": output})
    assert main(["--config", with_basis]) == 0
    assert os.path.isfile(tmp_path / "out" / "dog.safetensors")


def test_fp8_only_weights_train_on_the_basis_file(user_files, tiny_flux, tmp_path, capsys):
    basis = make_basis_file(tiny_flux.checkpoint, str(tmp_path / "flux1-dev-basis.safetensors"))
    config = config_on(tmp_path, user_files["fp8"], user_files["model"] | {"basis": str(tmp_path / "flux1-dev-basis.safetensors")})
    capsys.readouterr()
    assert main(["--config", config]) == 0
    said = capsys.readouterr().out
    assert f"basis {basis.basis_id} from" in said and "the loaded weights match its record" in said
    assert "F8_E4M3 rounding allows 6%" in said, said
    d = deltar.load(str(tmp_path / "out" / "dog.safetensors"))
    assert d.basis_id == basis.basis_id and d.names == basis.names
    assert max(float(t.abs().max()) for t in d.layers.values()) > 1e-4
    saved = load_basis(str(tmp_path / "out" / f"basis-{d.basis_id}.safetensors"))
    for name in basis.names:
        assert torch.equal(saved.q[name], basis.q[name]), name
    assert torch.equal(saved.weight_sketch, basis.weight_sketch)  # passed on, so Forge finds it by identity


def test_a_basis_of_another_model_names_both_files(user_files, tmp_path, capsys):
    from qrlora.tiny import make_tiny

    other = make_tiny("flux", str(tmp_path / "other"), seed=5)
    for given in (str(tmp_path / "other-basis.safetensors"), other.checkpoint):  # a basis file, a 16-bit file
        if given.endswith("other-basis.safetensors"):
            make_basis_file(other.checkpoint, given)
        config = config_on(tmp_path, user_files["fp8"], user_files["model"] | {"basis": given})
        with pytest.raises(IncompatibleFiles):
            Trainer(load_config(config), log=lambda s: None).prepare()
        capsys.readouterr()
        assert main(["--config", config]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert f"model.basis: {given} was made from another model than model.pretrained {user_files['fp8']}" in err
        assert "F8_E4M3 rounding allows 6%" in err and "qrlora basis flux1-dev.safetensors" in err, err
        assert not os.path.exists(tmp_path / "out" / "dog.safetensors")


def test_a_basis_file_of_another_rank_or_other_layers_is_refused(user_files, tiny_flux, tmp_path, capsys):
    rank8 = str(tmp_path / "r8.safetensors")
    make_basis_file(tiny_flux.checkpoint, rank8, rank=8)
    capsys.readouterr()
    assert main(["--config", config_on(tmp_path, user_files["fp8"], user_files["model"] | {"basis": rank8})]) == 2
    err = capsys.readouterr().err
    assert f"model.basis: {rank8} is a rank-8 basis and network.rank is {RANK}" in err, err

    every = str(tmp_path / "all.safetensors")
    make_basis_file(tiny_flux.checkpoint, every, targets="flux-all")
    capsys.readouterr()
    assert main(["--config", config_on(tmp_path, user_files["fp8"], user_files["model"] | {"basis": every})]) == 2
    err = capsys.readouterr().err
    assert f"model.basis: {every} covers" in err and "make the basis of network.targets" in err, err


# ----------------------------------------------------------------- bases the trainer makes
def _trained(folder, pretrained: str, model: dict | None = None, **kw):
    assert main(["--config", config_on(folder, pretrained, model or {}, steps=1, **kw)]) == 0
    d = deltar.load(str(folder / "out" / "dog.safetensors"))
    return d, str(folder / "out" / f"basis-{d.basis_id}.safetensors")


def test_a_basis_the_trainer_makes_records_the_weights_as_qrlora_basis_does(tiny_flux, diffusers_folder, tmp_path):
    """From a diffusers folder (no single file) and from a cache entry an older qrlora wrote
    (no record of the weights), the trainer's basis file records the projections of the weights."""
    reference = make_basis_file(tiny_flux.checkpoint, str(tmp_path / "reference.safetensors"))
    (tmp_path / "a").mkdir()
    d, path = _trained(tmp_path / "a", diffusers_folder)
    made = load_basis(path)
    assert made.basis_id == reference.basis_id == d.basis_id
    assert made.weight_sketch is not None and torch.equal(made.weight_sketch, reference.weight_sketch)

    # the built-in model's cache entry written without the record: computed again, with it
    cache = tmp_path / "cache"
    stale = load_basis(str(tmp_path / "reference.safetensors"))
    stale.weight_sketch = None
    from trainer.families.flux_load import tiny_model

    BasisCache(str(cache)).store(stale, tiny_model()[0], [t.name for t in stale.targets], "flux")
    assert load_basis(BasisCache(str(cache)).path_for(stale.basis_id)).weight_sketch is None
    (tmp_path / "b").mkdir()
    d, path = _trained(tmp_path / "b", "builtin:tiny-flux",
                       network=f'type = "qrlora"\nrank = {RANK}\nbasis_cache = "{cache}"')
    assert d.basis_id == reference.basis_id
    assert torch.equal(load_basis(path).weight_sketch, reference.weight_sketch)


def test_forge_finds_the_trainers_basis_for_a_quantized_model_by_identity(tiny_flux, user_files, diffusers_folder,
                                                                           tmp_path):
    """The user trains on the 16-bit model (here from a diffusers folder of it), copies the ΔR
    file and the basis file beside it into Forge, and loads the model stored in fp8: the basis is
    identified by the weights it records, and the tag is applied without a warning."""
    from tests.hosts import models
    from tests.hosts.harness import Host

    d, basis_path = _trained(tmp_path, diffusers_folder, lr="5e-2")
    loras, bases = tmp_path / "QRLoRA", tmp_path / "bases"
    loras.mkdir(), bases.mkdir()
    shutil.copy(tmp_path / "out" / "dog.safetensors", loras / "dog.safetensors")
    shutil.copy(basis_path, bases / os.path.basename(basis_path))
    h = Host("forge", str(tmp_path / "webui"), str(loras), basis_dir=str(bases))
    try:
        sd = models.forge_flux(tiny_flux.checkpoint, storage="float8_e4m3fn")
        sd.sd_checkpoint_info.filename = sd.filename = user_files["fp8"]
        h.load_model(sd)
        p = h.generate("<qrlora:dog:1>")
        text = " ".join(p.comments)
        assert "cannot check" not in text and "no basis matches" not in text, text
        assert any(sd.forge_objects.unet.lora_patches.values()), text
        assert h.engine.resolver.computations == 0  # never computed from the quantized weights
    finally:
        h.close()


# ----------------------------------------------------------------- schnell with a dev setting
def test_schnell_with_a_dev_guidance_setting_trains_and_warns_why(user_files, tiny_flux, tmp_path, capsys):
    """FLUX.1-schnell (no guidance embedding) with flux.guidance_scale set: the run says why
    the setting is ignored, and the file names schnell."""
    import json

    schnell = str(tmp_path / "flux1-schnell.safetensors")
    save_file({k: v for k, v in load_file(tiny_flux.checkpoint).items() if not k.startswith("guidance_in.")}, schnell)
    config_dir = tmp_path / "schnell-config"
    shutil.copytree(tiny_flux.config_dir, config_dir)
    transformer = config_dir / "transformer" / "config.json"
    transformer.write_text(json.dumps(json.loads(transformer.read_text()) | {"guidance_embeds": False}))
    model = user_files["model"] | {"config_dir": str(config_dir)}
    flux = 't5xxl_max_token_length = 16\nguidance_scale = 3.5'
    capsys.readouterr()
    assert main(["--config", config_on(tmp_path, schnell, model, flux=flux)]) == 0
    said = capsys.readouterr().out
    assert ("warning: flux.guidance_scale = 3.5 is ignored: FLUX.1-schnell is not guidance-distilled (its transformer"
            " has no guidance embedding, guidance_in)") in said, said
    meta = deltar.load(str(tmp_path / "out" / "dog.safetensors")).metadata
    assert meta["modelspec.architecture"] == "flux-1-schnell/qrlora" and meta["ss_guidance_scale"] == "0.0"
