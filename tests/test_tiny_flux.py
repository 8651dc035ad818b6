"""The tiny FLUX files (shared/tiny/flux.py) read back through diffusers' and transformers' own loaders."""

from __future__ import annotations

import filecmp
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _flux_oracle import diffusers_reference
from qrlora.tiny import make_tiny
from qrlora.tiny.flux import build_components


@pytest.fixture(scope="module")
def components():
    return build_components(0)


def config_path(tiny, name):
    return os.path.join(tiny.config_dir, name)


def weight_files(tiny) -> list[str]:
    return [tiny.checkpoint, *tiny.extra_files.values()]


def assert_same_state(actual: dict, expected: dict):
    assert actual.keys() == expected.keys(), set(actual) ^ set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def test_files(tiny_flux):
    assert tiny_flux.arch == "flux"
    assert os.path.basename(tiny_flux.checkpoint) == "flux1-tiny.safetensors"
    assert set(tiny_flux.extra_files) == {"vae", "clip_l", "t5"}
    names = ("transformer", "vae", "text_encoder", "text_encoder_2")
    for name in names:
        assert os.path.isfile(os.path.join(config_path(tiny_flux, name), "config.json"))
    assert sum(os.path.getsize(f) for f in weight_files(tiny_flux)) < 8_000_000


def test_transformer_round_trip(tiny_flux, components):
    from diffusers import FluxTransformer2DModel

    bfl = load_file(tiny_flux.checkpoint)
    for key in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                "guidance_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight",
                "double_blocks.1.txt_attn.norm.key_norm.scale", "single_blocks.1.norm.query_norm.scale"):
        assert key in bfl, key
    expected = components["transformer"].state_dict()
    converted = diffusers_reference(bfl)
    assert_same_state(converted, expected)
    # The converter swaps final_layer's (shift, scale) into diffusers' (scale, shift) order.
    shift, scale = bfl["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(expected["norm_out.linear.weight"], torch.cat([scale, shift]))

    config = FluxTransformer2DModel.load_config(config_path(tiny_flux, "transformer"))
    model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict(converted, strict=True)
    image_tokens, text_tokens = 16, 8
    with torch.no_grad():
        out = model(
            hidden_states=torch.randn(1, image_tokens, 64),
            encoder_hidden_states=torch.randn(1, text_tokens, 32),
            pooled_projections=torch.randn(1, 32),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(image_tokens, 3),
            txt_ids=torch.zeros(text_tokens, 3),
            guidance=torch.tensor([3.5]),
        ).sample
    assert out.shape == (1, image_tokens, 64) and torch.isfinite(out).all()


def test_vae_round_trip(tiny_flux, components):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = load_file(tiny_flux.extra_files["vae"])
    assert "encoder.conv_in.weight" in ldm and "decoder.up.3.upsample.conv.weight" in ldm
    assert not any("quant_conv" in k for k in ldm)  # FLUX's AE has none
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    config = AutoencoderKL.load_config(config_path(tiny_flux, "vae"))
    assert (config["latent_channels"], config["scaling_factor"], config["shift_factor"]) == (16, 0.3611, 0.1159)
    converted = convert_ldm_vae_checkpoint(ldm, config)
    assert_same_state(converted, components["vae"].state_dict())

    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(converted, strict=True)
    with torch.no_grad():
        latents = vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 16, 8, 8)  # 8x downsampling, 16 channels: FLUX's latent space


def test_clip_l(tiny_flux, components):
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = load_file(tiny_flux.extra_files["clip_l"])
    assert all(k.startswith("text_model.") for k in sd)
    assert {t.dtype for t in sd.values()} == {torch.float16}
    assert sd["text_model.embeddings.token_embedding.weight"].shape[0] == 49408
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(config_path(tiny_flux, "text_encoder")))
    own_keys = model.state_dict().keys()
    if not any(k.startswith("text_model.") for k in own_keys):
        # transformers >= 5 dropped the text_model level (it strips it in from_pretrained).
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    expected = components["text_encoder"].state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[key]), key  # fp16 file, fp16-exact weights: lossless


def test_t5(tiny_flux, components):
    from transformers import T5Config, T5EncoderModel

    sd = load_file(tiny_flux.extra_files["t5"])
    assert {t.dtype for t in sd.values()} == {torch.float16}
    assert sd["shared.weight"].shape == (32128, 32)
    # Like the released t5xxl files, only shared.weight is stored; encoder.embed_tokens is tied to it.
    assert "encoder.embed_tokens.weight" not in sd
    model = T5EncoderModel(T5Config.from_pretrained(config_path(tiny_flux, "text_encoder_2")))
    model.load_state_dict({**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}, strict=True)
    expected = components["text_encoder_2"].state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[100, 2000, 1]])).last_hidden_state
    assert hidden.shape == (1, 3, 32) and torch.isfinite(hidden).all()


def test_same_seed_same_bytes(tiny_flux, tmp_path):
    again = make_tiny("flux", str(tmp_path / "again"), seed=0)
    for a, b in zip(weight_files(tiny_flux), weight_files(again)):
        assert filecmp.cmp(a, b, shallow=False), a
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = (os.path.join(config_path(t, name), "config.json") for t in (tiny_flux, again))
        assert filecmp.cmp(a, b, shallow=False), name


def test_other_seed_other_weights(components):
    other = build_components(1)["transformer"].state_dict()
    same = components["transformer"].state_dict()
    assert not any(torch.equal(other[k], same[k]) for k in same)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_components(0)
    assert torch.equal(torch.rand(3), expected)


def test_no_shared_tensors_in_files(tiny_flux):
    # Every parameter differs from every other, so a key swapped in a map cannot go unseen.
    with safe_open(tiny_flux.checkpoint, "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    for i, a in enumerate(tensors):
        for b in tensors[i + 1:]:
            assert a.shape != b.shape or not torch.equal(a, b)
