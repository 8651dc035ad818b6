"""The lab base model: its built VAE, the batched sampler, and the committed checkpoint, which
loads like any SDXL file (the trainer's loader, ``qrlora basis``) and re-scores within the
figures recorded when it was trained."""

import json
import os
import subprocess
import sys

import pytest
import torch

from trainer.lab import model, pretrain, score, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_BASE = os.path.join(ROOT, "examples", "lab", "lab-base.safetensors")
LAB_CONFIG = os.path.join(ROOT, "examples", "lab", "config")
needs_base = pytest.mark.skipif(not os.path.isfile(LAB_BASE), reason="examples/lab/lab-base.safetensors not built")


def test_vae_encodes_two_by_two_means_and_decodes_them_back(single_threaded):
    vae = model.block_vae()
    scenes = world.sample_scenes(8, seed=1, combos=world.Vocabulary().combinations())
    pixels = world.to_pixels(world.render_batch(scenes))
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        latents = dist.sample(torch.Generator().manual_seed(0))
        decoded = vae.decode(latents).sample
    means = torch.nn.functional.avg_pool2d(pixels, 2)
    assert latents.shape == (8, 4, 16, 16)
    assert (latents[:, :3] - means).abs().max() < 1e-4  # the sampling noise is ~3e-7
    assert latents[:, 3].abs().max() < 1e-4
    blocks = torch.nn.functional.interpolate(means, scale_factor=2, mode="nearest")
    assert (decoded - blocks).abs().max() * 127.5 < 0.5  # under half an 8-bit level


def test_vae_round_trip_keeps_the_base_worlds_labels_readable(single_threaded):
    """The ceiling the base model is measured against: renders through the VAE and back."""
    vocab = pretrain.BASE_VOCABULARY
    scenes = world.sample_scenes(200, seed=2, combos=vocab.combinations())
    vae = model.block_vae()
    with torch.no_grad():
        decoded = vae.decode(vae.encode(world.to_pixels(world.render_batch(scenes))).latent_dist.mode()).sample
    acc = score.accuracy(score.read_batch(decoded, shapes=vocab.shapes, patterns=vocab.patterns), scenes)
    assert acc["colour"] == 1.0 and acc["background"] == 1.0
    assert acc["shape"] >= 0.97


def test_batched_sampling_equals_the_familys_one_image_sampler(single_threaded):
    from trainer.families import get_family
    from trainer.lab.sample import sample_batch

    family = get_family("sdxl")
    models = pretrain.memory_models(model.build(0), family)
    prompts, seeds = ["a red circle on white", "a blue cross on black"], [7, 8]
    batch = sample_batch(family, models, prompts, seeds, steps=4, guidance_scale=2.0, sampler="euler_a")
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        image = family.sample(models, prompt, "", steps=4, guidance_scale=2.0, seed=seed, sampler="euler_a")
        one = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
        one = one.permute(2, 0, 1)
        assert (((batch[i] + 1) * 127.5).round() - one.float()).abs().max() <= 1


@needs_base
def test_lab_base_loads_through_the_trainers_sdxl_loader_and_qrlora_basis(tmp_path, single_threaded):
    from trainer.families import get_family

    assert get_family("sdxl").recognises(LAB_BASE)
    models = pretrain.load(LAB_BASE, LAB_CONFIG)
    assert models.basis_source == LAB_BASE
    with open(os.path.splitext(LAB_BASE)[0] + ".json", encoding="utf-8") as f:
        assert models.noise_scheduler.config.prediction_type == json.load(f)["recipe"]["prediction_type"]
    out = tmp_path / "basis.safetensors"
    run = subprocess.run([sys.executable, "-m", "qrlora", "basis", LAB_BASE, "--rank", "4", "-o", str(out),
                          "--cache", str(tmp_path / "cache")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from qrlora.checkpoint import SafetensorsFile

    keys = SafetensorsFile(str(out)).keys
    assert any("attn2.to_k" in k for k in keys)  # no text-key projection refused (examples/lab/striped.toml)


@needs_base
def test_lab_base_rescores_within_its_record(single_threaded):
    with open(os.path.splitext(LAB_BASE)[0] + ".json", encoding="utf-8") as f:
        record = json.load(f)
    n = pretrain.SPOT_CHECK
    got = pretrain.reevaluate(LAB_BASE, samples=n, write=False)["heldout"]
    recorded = record["heldout"][f"first_{n}"]
    # The same scenes, seeds and sampler as the recorded run: the same images up to float
    # summation order (thread count), so at most one image may read differently.
    for kind in ("colour", "shape", "background"):
        assert abs(got[kind] - recorded[kind]) <= 1 / n, (kind, got, recorded)


@needs_base
def test_lab_base_reaches_the_quality_goal():
    with open(os.path.splitext(LAB_BASE)[0] + ".json", encoding="utf-8") as f:
        heldout = json.load(f)["heldout"]
    assert heldout["colour"] >= 0.95 and heldout["shape"] >= 0.95


def test_text_encoders_pass_each_word_through_on_its_own(single_threaded):
    """The conditioning at a position is its own word's: changing one word of a caption
    changes the other positions' hidden states by well under 1 % of the change at the word
    (the random tiny CLIPs as drawn mix it into every later token, 5x more than at the word)."""
    from trainer.families import get_family

    family = get_family("sdxl")
    models = pretrain.memory_models(model.build(0), family)
    assert pretrain.word_mixing(family, models) < 0.01
    conds = family.encode_prompts(models, ["a red circle on white", "a red circle on black"])
    pads = conds["encoder_hidden_states"][:, 8:]  # the end token and the padding after it
    assert (pads - pads.mean(dim=(0, 1))).norm(dim=-1).max() < 0.05 * pads.norm(dim=-1).mean()


def test_pooled_text_embedding_summarises_the_caption_without_touching_the_word_vectors(single_threaded):
    """SDXL's pooled embedding (TE2's last layer at the end token) tells captions apart by any
    one word, the shape word included, while the penultimate hidden states (what
    cross-attention reads) are exactly those of the encoders without the summary."""
    from trainer.families import get_family

    family = get_family("sdxl")
    captions = ["a red circle on white", "a red square on white", "a blue circle on white", "a red circle on black"]
    summary = family.encode_prompts(pretrain.memory_models(model.build(0), family), captions)
    plain = family.encode_prompts(pretrain.memory_models(model.build(0, pooled_summary=False), family), captions)
    assert torch.equal(summary["encoder_hidden_states"], plain["encoder_hidden_states"])
    changes = {}
    for name, conds in (("summary", summary), ("plain", plain)):
        pooled = torch.nn.functional.normalize(conds["text_embeds"], dim=-1)
        changes[name] = [(1 - pooled[0] @ pooled[i]).item() for i in (1, 2, 3)]  # shape, colour, background word
    # one word of seven tokens moves the summary's direction by 8-14 % (1 - cos); without the
    # summary the end token's own vector swamps it: below 1e-4
    assert min(changes["summary"]) > 0.05 and max(changes["plain"]) < 1e-4, changes


def test_diffusers_single_file_loader_reads_the_lab_base_with_its_config_folder(v_prediction_lab_file, single_threaded):
    """``StableDiffusionXLPipeline.from_single_file(path, config=config_dir)`` offline, CLIP's
    tokenizers passed in. The second text encoder is passed in too: diffusers tells the two
    encoders of a single file apart by their width, and the lab's are both 32 wide."""
    from diffusers import StableDiffusionXLPipeline

    path, config_dir = v_prediction_lab_file
    ours = pretrain.load(path, config_dir)
    pipe = StableDiffusionXLPipeline.from_single_file(
        path, config=config_dir, tokenizer=ours.tokenizers[0], tokenizer_2=ours.tokenizers[1],
        text_encoder_2=ours.text_encoders[1], local_files_only=True, torch_dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for theirs, mine in ((pipe.unet, ours.denoiser), (pipe.vae, ours.vae), (pipe.text_encoder, ours.text_encoders[0])):
        expected = mine.state_dict()
        got = theirs.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key].float(), value.float()), key


@pytest.fixture(scope="module")
def built_lab_file(tmp_path_factory):
    """An untrained lab base written by the same writer as the trained one."""
    folder = tmp_path_factory.mktemp("lab")
    path = str(folder / "lab.safetensors")
    model.write(model.build(0), path, str(folder / "config"), {"qrlora.lab": "test"})
    return path, str(folder / "config")


def test_a_written_lab_base_loads_through_the_trainers_sdxl_loader(built_lab_file, single_threaded):
    from trainer.families import get_family

    path, config_dir = built_lab_file
    family = get_family("sdxl")
    assert family.recognises(path)
    models = pretrain.load(path, config_dir)
    reference = model.build(0)
    # fp16 in the file, as released SDXL files: the loaded UNet is the built one rounded to fp16
    for (name, loaded), built in zip(models.denoiser.state_dict().items(), reference["unet"].state_dict().values()):
        assert torch.equal(loaded, built.half().float()), name
    assert family.vae_scale_factor(models) == 2 and family.default_size(models) == (32, 32)
    pixels = world.to_pixels(world.render_batch(world.sample_scenes(2, seed=0, combos=pretrain.BASE_VOCABULARY.combinations())))
    latents = family.encode_images(models, pixels)
    assert (latents[:, :3] - torch.nn.functional.avg_pool2d(pixels, 2)).abs().max() < 1e-3


def test_qrlora_basis_accepts_the_lab_base(built_lab_file, tmp_path):
    path, _ = built_lab_file
    out = tmp_path / "basis.safetensors"
    run = subprocess.run([sys.executable, "-m", "qrlora", "basis", path, "--rank", "4", "-o", str(out),
                          "--cache", str(tmp_path / "cache")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from qrlora.checkpoint import SafetensorsFile

    assert len(SafetensorsFile(str(out)).keys) >= 48  # the UNet's 48 transformer linears


def test_pixel_space_vae_keeps_every_pixel(single_threaded):
    """``factor`` 1: the same construction without the 2x2 down/up-sampling, latents = pixels."""
    vae = model.block_vae(factor=1)
    pixels = world.to_pixels(world.render_batch(world.sample_scenes(4, seed=3, combos=world.Vocabulary().combinations())))
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (4, 4, 32, 32)
    assert (latents[:, :3] - pixels).abs().max() < 1e-4
    assert (decoded - pixels).abs().max() * 127.5 < 0.5


@pytest.fixture(scope="module")
def v_prediction_lab_file(tmp_path_factory):
    """An untrained lab base with attention at both levels, written with a v-prediction schedule."""
    from trainer.families import get_family

    folder = tmp_path_factory.mktemp("lab-v")
    components = model.build(0, attention="both")
    schedule = pretrain.memory_models(components, get_family("sdxl"), "v_prediction").noise_scheduler.config
    path = str(folder / "lab.safetensors")
    model.write(components, path, str(folder / "config"), {"qrlora.lab": "test"}, scheduler=dict(schedule))
    return path, str(folder / "config")


def test_a_v_prediction_single_file_loads_as_v_prediction_from_its_config_dir(v_prediction_lab_file, single_threaded):
    path, config_dir = v_prediction_lab_file
    models = pretrain.load(path, config_dir)
    assert models.noise_scheduler.config.prediction_type == "v_prediction"
    attention = [n for n in models.denoiser.state_dict() if n.endswith("attn2.to_k.weight")]
    assert any(n.startswith("down_blocks.0.") for n in attention)  # attention at the 32-channel level too


def test_the_trainer_config_reads_and_overrides_the_prediction_type(v_prediction_lab_file, tmp_path, single_threaded):
    from trainer.config import load_config
    from trainer.setup import load_models

    path, config_dir = v_prediction_lab_file
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\npretrained = "{path}"\nconfig_dir = "{config_dir}"\n'
                    f'[training]\noutput_dir = "{tmp_path / "out"}"\n'
                    '[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "."\n', encoding="utf-8")
    cfg = load_config(str(toml), check_paths=False)
    assert cfg.model.prediction_type is None  # the model's own schedule decides
    assert load_models(cfg, torch.device("cpu"))[1].noise_scheduler.config.prediction_type == "v_prediction"
    cfg = load_config(str(toml), ["model.prediction_type=epsilon"], check_paths=False)
    assert load_models(cfg, torch.device("cpu"))[1].noise_scheduler.config.prediction_type == "epsilon"
    with pytest.raises(Exception, match="v_parameterization.*model.prediction_type"):
        load_config(str(toml), ["model.v_parameterization=true"], check_paths=False)


def test_pretraining_is_a_function_of_its_recipe_and_a_probe_does_not_change_it(single_threaded):
    """Two short runs of one recipe give the same weights, also when one of them is probed
    (the EMA UNet sampled and scored mid-run, as docs/lab.md's probes were)."""
    recipe = pretrain.Recipe(steps=3, batch_size=4, threads=1)
    plain = pretrain.train(recipe, say=lambda m: None)["components"]["unet"].state_dict()
    seen = []
    probed = pretrain.train(recipe, say=lambda m: None, probe=lambda step, c: seen.append((step, c["unet"].training)),
                            probe_every=1)["components"]["unet"].state_dict()
    assert seen == [(1, False), (2, False)]
    for name, value in plain.items():
        assert torch.equal(value, probed[name]), name
