"""The SDXL model family on the tiny SDXL: loading (built-in, SGM file, diffusers folder),
layer names and base weights, text and image encoding, the training loss, sampling."""

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qrlora.archs.sdxl import SDXL
from qrlora.checkpoint import SafetensorsFile
from qrlora.tiny.sdxl import build_components
from trainer.families import detect_family, get_family
from trainer.families import sdxl_load as L
from trainer.families.sdxl import min_snr_weight, time_ids
from trainer.tokenizers import tiny_clip_tokenizer_folder

BUILTIN = "builtin:tiny-sdxl"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Point the trainer's cache at a temporary folder for this module."""
    folder = str(tmp_path_factory.mktemp("qrlora-cache"))
    old = os.environ.get("QRLORA_CACHE")
    os.environ["QRLORA_CACHE"] = folder
    yield folder
    if old is None:
        os.environ.pop("QRLORA_CACHE")
    else:
        os.environ["QRLORA_CACHE"] = old


@pytest.fixture(scope="module")
def family():
    return get_family("sdxl")


@pytest.fixture(scope="module")
def tiny(cache, family):
    return family.load(SimpleNamespace(pretrained=BUILTIN), "cpu", torch.float32)


@pytest.fixture(scope="module")
def components():
    return build_components(0)


@pytest.fixture(scope="module")
def folder(components, tmp_path_factory):
    """A diffusers SDXL folder saved from the tiny model's components (no tokenizers in it)."""
    root = tmp_path_factory.mktemp("tiny-diffusers")
    for name, module in components.items():
        module.save_pretrained(str(root / name))
    return str(root)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_clip_tokenizer_folder(str(tmp_path_factory.mktemp("tok")))


def _assert_same_weights(module, reference):
    got, want = module.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_builtin_loads_the_tiny_weights(tiny, components):
    assert tiny.family == "sdxl" and tiny.basis_source and os.path.isfile(tiny.basis_source)
    _assert_same_weights(tiny.denoiser, components["unet"])
    _assert_same_weights(tiny.text_encoders[0], components["text_encoder"])
    _assert_same_weights(tiny.text_encoders[1], components["text_encoder_2"])
    _assert_same_weights(tiny.vae, components["vae"])
    assert not any(p.requires_grad for p in tiny.denoiser.parameters())
    assert tiny.noise_scheduler.config.prediction_type == "epsilon"
    assert tiny.noise_scheduler.config.num_train_timesteps == 1000


def test_detect_family(tiny, folder, family):
    assert detect_family(BUILTIN) is family
    assert detect_family(tiny.basis_source) is family
    assert detect_family(folder) is family
    with pytest.raises(ValueError, match="built-in"):
        detect_family("builtin:nope")


def test_sgm_file_and_diffusers_folder_agree(tiny, folder, tokenizer_dir, family):
    # the cached built-in file, loaded as a user's single file with its config dir
    config_dir = os.path.join(os.path.dirname(tiny.basis_source), "config")
    # a user's single file has no tokenizer of its own: give one, as offline users must
    as_file = family.load(SimpleNamespace(pretrained=tiny.basis_source, config_dir=config_dir, tokenizer=tokenizer_dir),
                          "cpu", torch.float32)
    as_folder = family.load(SimpleNamespace(pretrained=folder, tokenizer=tokenizer_dir), "cpu", torch.float32)
    assert as_folder.basis_source is None and as_file.basis_source == tiny.basis_source
    assert as_file.identity == tiny.identity and as_folder.identity != tiny.identity

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    hidden, pooled = torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    outs = [m.denoiser(x, torch.tensor([10, 700]), encoder_hidden_states=hidden,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample for m in (as_file, as_folder)]
    assert torch.equal(outs[0], outs[1])

    # same targets (names, original-layout keys and rows, shapes) whichever way it was loaded
    assert family.targets(as_folder) == family.targets(as_file)
    for target in family.targets(as_file)[::7]:
        a, b = family.base_weight(as_file, target.name), family.base_weight(as_folder, target.name)
        assert a.dtype == torch.float16 and torch.equal(a.float(), b.float()), target.name


def test_trainable_modules_are_the_targets_with_file_weights(tiny, family):
    ckpt = SafetensorsFile(tiny.basis_source)
    targets = SDXL().linear_targets(ckpt.shapes())
    modules = family.trainable_modules(tiny, include_text_encoders=True)
    assert set(modules) == {t.name for t in targets}
    assert {t.name for t in family.targets(tiny)} == set(modules)
    unet_only = family.trainable_modules(tiny, include_text_encoders=False)
    assert set(unet_only) == {t.name for t in targets if t.name.startswith("unet.")}
    assert any(t.rows for t in targets)  # TE2 q/k/v are row blocks of in_proj_weight
    for t in targets:
        stored = ckpt.tensor(t.key)
        stored = stored[t.rows[0] : t.rows[1]] if t.rows else stored
        assert isinstance(modules[t.name], torch.nn.Linear)
        assert torch.equal(modules[t.name].weight, stored.float()), t.name
        assert torch.equal(family.base_weight(tiny, t.name), stored), t.name


def test_encode_prompts(tiny, family):
    captions = ["a photo of a dog", "", "a watercolor painting of a cat, best quality"]
    conds = family.encode_prompts(tiny, captions)
    assert conds["encoder_hidden_states"].shape == (3, 77, 32 + 32)
    assert conds["text_embeds"].shape == (3, 32)
    assert not conds["encoder_hidden_states"].requires_grad
    # kohya's end-token pooling equals transformers' own pooled projection for these tokens
    ids = tiny.tokenizers[1](captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.allclose(conds["text_embeds"], tiny.text_encoders[1](ids).text_embeds, atol=1e-6)
    # SDXL padding: tokenizer 1 pads with the end token, tokenizer 2 with "!" (id 0)
    assert tiny.tokenizers[0].pad_token_id == tiny.tokenizers[0].eos_token_id and tiny.tokenizers[1].pad_token_id == 0
    # with_grad: gradients reach the text encoders
    layer = tiny.text_encoders[0].get_input_embeddings()
    layer.weight.requires_grad_(True)
    try:
        family.encode_prompts(tiny, captions[:1], with_grad=True)["encoder_hidden_states"].sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    finally:
        layer.weight.requires_grad_(False)
        layer.weight.grad = None


def test_encode_images(tiny, family):
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = family.encode_images(tiny, pixels, torch.Generator().manual_seed(1))
    b = family.encode_images(tiny, pixels, torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 32, 24) and a.dtype == torch.float32 and torch.equal(a, b)
    with torch.no_grad():  # a VAE sample times SDXL's scaling factor, as kohya caches them
        by_hand = tiny.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1)) * 0.13025
    assert torch.allclose(a, by_hand)


def _batch(b=2):
    g = torch.Generator().manual_seed(3)
    return {"latents": torch.randn(b, 4, 16, 16, generator=g), "original_size": [(40, 30)] * b,
            "crop_top_left": [(0, 4)] * b, "target_size": [(32, 32)] * b}


def test_training_loss_per_sample_with_gradient(tiny, family):
    conds = family.encode_prompts(tiny, ["a dog", "a cat"])
    to_q = tiny.denoiser.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    to_q.weight.requires_grad_(True)
    try:
        loss = family.training_loss(tiny, _batch(), conds, torch.Generator().manual_seed(0), noise_offset=0.05)
        assert loss.shape == (2,) and torch.isfinite(loss).all()
        loss.mean().backward()
        assert to_q.weight.grad is not None and to_q.weight.grad.abs().sum() > 0
    finally:
        to_q.weight.requires_grad_(False)
        to_q.weight.grad = None
    again = family.training_loss(tiny, _batch(), conds, torch.Generator().manual_seed(0), noise_offset=0.05)
    assert torch.equal(loss.detach(), again)


def test_min_snr_weight_by_hand(tiny, family):
    steps = torch.tensor([5, 400, 999])
    conds = family.encode_prompts(tiny, ["a", "b", "c"])
    batch = _batch(3)
    plain = family.training_loss(tiny, batch, conds, torch.Generator().manual_seed(0), timesteps=steps)
    weighted = family.training_loss(tiny, batch, conds, torch.Generator().manual_seed(0), min_snr_gamma=5.0, timesteps=steps)
    # SDXL's schedule by hand, in float64: betas linear in sqrt space, SNR = ᾱ/(1-ᾱ)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[steps]
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    assert expected[0] < 0.1 and expected[2] == 1.0  # low-noise steps are down-weighted
    assert torch.allclose((weighted / plain).double(), expected, rtol=1e-4)
    v = min_snr_weight(tiny.noise_scheduler.alphas_cumprod, steps, 5.0, v_prediction=True)
    assert torch.allclose(v.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1), rtol=1e-4)


def test_time_ids_order():
    batch = {"original_size": [(100, 200)], "crop_top_left": [(3, 4)], "target_size": [(64, 32)]}
    assert time_ids(batch, 1, (8, 8)).tolist() == [[100, 200, 3, 4, 64, 32]]
    kohya = {"original_sizes_hw": torch.tensor([[100, 200]]), "crop_top_lefts": torch.tensor([[3, 4]])}
    assert time_ids(kohya, 1, (64, 48)).tolist() == [[100, 200, 3, 4, 64, 48]]


@pytest.mark.parametrize("sampler", ["euler_a", "euler", "ddim"])
def test_sample_size_and_seed(tiny, family, sampler):
    kw = dict(negative_prompt="blurry", width=64, height=48, steps=4, guidance_scale=5.0, sampler=sampler)
    a = family.sample(tiny, "a photo of a dog", seed=7, **kw)
    b = family.sample(tiny, "a photo of a dog", seed=7, **kw)
    c = family.sample(tiny, "a photo of a dog", seed=8, **kw)
    assert a.size == (64, 48) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert family.default_size(tiny) == (64, 64)
    with pytest.raises(ValueError, match="sampler"):
        family.sample(tiny, "x", sampler="nope")


def test_vae_override(tiny, folder, tokenizer_dir, family):
    config_dir = os.path.join(os.path.dirname(tiny.basis_source), "config")
    cfg = SimpleNamespace(pretrained=tiny.basis_source, config_dir=config_dir, vae=os.path.join(folder, "vae"),
                          tokenizer=tokenizer_dir)
    models = family.load(cfg, "cpu", torch.float16)
    _assert_same_weights(models.vae, tiny.vae)  # fp16 weights: the VAE stays float32
    assert models.vae.dtype == torch.float32 and models.denoiser.dtype == torch.float16
    assert models.identity != tiny.identity


def test_real_sdxl_shapes_are_recognised_and_odd_shapes_need_config_dir(tiny):
    from qrlora.tiny.real import real_shapes

    full = L.real_sdxl_shapes()
    assert L.configs_for_file("sd_xl_base_1.0.safetensors", full, None).source == "SDXL base 1.0"
    assert L.real_sdxl_mismatch(real_shapes("sdxl")) is None  # a file without a VAE is still SDXL base
    odd = dict(full)
    odd["model.diffusion_model.input_blocks.4.1.proj_in.weight"] = (640, 320)
    assert "proj_in" in L.real_sdxl_mismatch(odd)
    with pytest.raises(ValueError, match="config_dir"):
        L.configs_for_file(tiny.basis_source, SafetensorsFile(tiny.basis_source).shapes(), None)


def test_single_file_key_maps_are_strict(tiny, tmp_path, family):
    sd = load_file(tiny.basis_source)
    sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.bogus"] = torch.zeros(1)
    path = str(tmp_path / "odd.safetensors")
    from safetensors.torch import save_file

    save_file(sd, path)
    config_dir = os.path.join(os.path.dirname(tiny.basis_source), "config")
    with pytest.raises(ValueError, match="bogus"):
        family.load(SimpleNamespace(pretrained=path, config_dir=config_dir), "cpu", torch.float32)
