"""The tiny SGM SDXL file: diffusers' converters read back exactly the modules it was built
from, it is reproducible from its seed, and its configs load."""

import os

import pytest
import torch
from safetensors.torch import load_file

from qrlora.archs.sdxl import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX
from qrlora.checkpoint import sha256_file
from qrlora.tiny.sdxl import CHECKPOINT_NAME, VAE_PREFIX, build_components, clip_checkpoint_keys, make


@pytest.fixture(scope="module")
def tiny(tiny_sdxl):
    return load_file(tiny_sdxl.checkpoint), build_components(0)


def _assert_same(converted: dict, reference: dict):
    assert set(converted) == set(reference)
    for key, value in reference.items():
        assert converted[key].dtype == torch.float16, key
        assert torch.equal(converted[key].float(), value), key


def test_unet_round_trip(tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd, components = tiny
    unet = components["unet"]
    _assert_same(convert_ldm_unet_checkpoint(sd, unet.config), unet.state_dict())


def test_vae_round_trip(tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd, components = tiny
    vae = components["vae"]
    _assert_same(convert_ldm_vae_checkpoint(sd, vae.config), vae.state_dict())


def test_text_encoder_round_trip(tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    sd, components = tiny
    converted = convert_ldm_clip_checkpoint(sd)
    # Real SDXL files carry the position-ids buffer; transformers no longer saves it.
    position_ids = converted.pop("text_model.embeddings.position_ids")
    assert torch.equal(position_ids, torch.arange(77)[None])
    _assert_same(converted, clip_checkpoint_keys(components["text_encoder"].state_dict()))


def test_text_encoder_2_round_trip(tiny):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sd, components = tiny
    te2 = components["text_encoder_2"]
    _assert_same(convert_open_clip_checkpoint(te2, sd, prefix=TE2_PREFIX), te2.state_dict())
    # OpenCLIP stores the projection as used (pooled @ P): the transpose of HF's Linear weight.
    assert torch.equal(sd[TE2_PREFIX + "text_projection"].float(), te2.text_projection.weight.T)


def test_file_layout(tiny_sdxl, tiny):
    sd, _ = tiny
    prefixes = (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX, VAE_PREFIX)
    assert all(k.startswith(prefixes) for k in sd)
    assert all(any(k.startswith(p) for k in sd) for p in prefixes)
    assert {v.dtype for k, v in sd.items() if not k.endswith("position_ids")} == {torch.float16}
    # full CLIP vocabulary and context, so the real BPE tokenizer can drive both encoders
    assert sd[TE1_PREFIX + "text_model.embeddings.token_embedding.weight"].shape[0] == 49408
    assert sd[TE2_PREFIX + "token_embedding.weight"].shape[0] == 49408
    assert sd[TE2_PREFIX + "positional_embedding"].shape[0] == 77
    assert os.path.getsize(tiny_sdxl.checkpoint) < 8 * 2**20
    assert tiny_sdxl.arch == "sdxl" and os.path.basename(tiny_sdxl.checkpoint) == CHECKPOINT_NAME


def test_same_seed_same_bytes_other_seed_other_weights(tiny_sdxl, tiny, tmp_path):
    again = make(str(tmp_path / "again"), seed=0)
    assert sha256_file(again.checkpoint) == sha256_file(tiny_sdxl.checkpoint)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        with open(os.path.join(again.config_dir, name, "config.json")) as a, \
                open(os.path.join(tiny_sdxl.config_dir, name, "config.json")) as b:
            assert a.read() == b.read()

    other = load_file(make(str(tmp_path / "other"), seed=1).checkpoint)
    sd, _ = tiny
    assert set(other) == set(sd)
    same = [k for k in sd if sd[k].is_floating_point() and sd[k].numel() > 1 and torch.equal(sd[k], other[k])]
    assert same == []


def test_configs_load(tiny_sdxl, tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _, components = tiny
    folder = tiny_sdxl.config_dir
    rebuilt = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(folder, "unet"))),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(folder, "vae"))),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder"))),
        "text_encoder_2": CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder_2"))),
    }
    for name, model in rebuilt.items():
        ours = {k: v.shape for k, v in components[name].state_dict().items()}
        assert {k: v.shape for k, v in model.state_dict().items()} == ours, name
    assert rebuilt["vae"].config.scaling_factor == 0.13025


def test_from_single_file_with_config(tiny_sdxl, tiny):
    """What a user does with the file: diffusers' single-file loader, offline, with our configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _, components = tiny
    for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        model = cls.from_single_file(tiny_sdxl.checkpoint, config=tiny_sdxl.config_dir, subfolder=name,
                                     local_files_only=True)
        reference = components[name].state_dict()
        loaded = model.state_dict()
        assert set(loaded) == set(reference)
        assert all(torch.equal(loaded[k].float(), v) for k, v in reference.items()), name


def test_unet_forward(tiny):
    _, components = tiny
    unet, te1, te2 = components["unet"], components["text_encoder"], components["text_encoder_2"]
    ids = torch.full((1, 77), 49407)  # CLIP BPE ids: start, "a", end, padded with end as TE1's tokenizer does
    ids[0, :3] = torch.tensor([49406, 320, 49407])
    with torch.no_grad():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        context = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        noise = unet(latent, 500, context, added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids})
    assert noise.sample.shape == latent.shape and torch.isfinite(noise.sample).all()
