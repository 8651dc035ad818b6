"""The FLUX family on the built-in tiny FLUX.1-dev: the loss is kohya's rectified-flow loss
computed with diffusers' own FluxPipeline helpers, the T5 mask really masks, the options that
do not apply say so, samples follow the seed and the guidance embedding, and text outputs
survive freeing the encoders."""

from types import SimpleNamespace

import pytest
import torch

from trainer.families import get_family
from trainer.families.flux import DEV_GUIDANCE, FlowObjective, objective_for

family = get_family("flux")


@pytest.fixture(scope="module")
def tiny(single_threaded):
    return family.load(SimpleNamespace(pretrained="builtin:tiny-flux"), "cpu", torch.float32)


def flux_options(**kw):
    base = dict(timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0, model_prediction_type="raw",
                guidance_scale=None, t5xxl_max_token_length=None, apply_t5_attn_mask=False,
                offload_text_encoders=False, sample_guidance_scale=3.5)
    base.update(kw)
    return SimpleNamespace(**base)


def with_objective(models, **kw):
    models.info["objective"] = FlowObjective(**{"t5_tokens": 16, **kw})
    return models


def test_objective_defaults_follow_kohya_for_dev_and_schnell():
    dev, warnings = objective_for(flux_options(), is_schnell=False)
    assert (dev.guidance_scale, dev.t5_tokens, warnings) == (DEV_GUIDANCE, 512, [])
    schnell, warnings = objective_for(flux_options(), is_schnell=True)
    assert (schnell.guidance_scale, schnell.t5_tokens, warnings) == (None, 256, [])
    schnell, (warning,) = objective_for(flux_options(guidance_scale=3.5, t5xxl_max_token_length=128), is_schnell=True)
    assert schnell.guidance_scale is None and schnell.t5_tokens == 128
    assert "flux.guidance_scale = 3.5 is ignored: FLUX.1-schnell is not guidance-distilled" in warning
    assert "no guidance embedding" in warning


def test_min_snr_and_noise_offset_say_they_do_not_apply(tiny):
    cfg = SimpleNamespace(flux=flux_options(t5xxl_max_token_length=16),
                          training=SimpleNamespace(min_snr_gamma=5.0, noise_offset=0.1),
                          network=SimpleNamespace(train_text_encoder=True))
    source = tiny.tokenizer_source
    try:
        warnings = family.configure(tiny, cfg)
    finally:
        tiny.tokenizer_source = source
    assert len(warnings) == 3
    assert warnings[0].startswith("training.min_snr_gamma does not apply to FLUX and is ignored")
    assert warnings[1].startswith("training.noise_offset does not apply to FLUX and is ignored")
    assert warnings[2].startswith("network.train_text_encoder is ignored for FLUX")


def test_latents_are_shifted_and_scaled(tiny):
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = family.encode_images(tiny, pixels, torch.Generator().manual_seed(1))
    vae = tiny.vae
    raw = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
    assert vae.config.shift_factor != 0
    assert torch.allclose(latents, (raw - vae.config.shift_factor) * vae.config.scaling_factor)


def test_loss_is_the_rectified_flow_loss_of_diffusers_fluxpipeline(tiny):
    from diffusers import FluxPipeline

    with_objective(tiny, guidance_scale=2.5)
    latents = torch.randn(2, 16, 4, 6)
    conds = family.encode_prompts(tiny, ["a dog", "a red cat"])
    got = family.training_loss(tiny, {"latents": latents}, conds, torch.Generator().manual_seed(5),
                               timesteps=torch.tensor([300, 700]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.3, 0.7]).view(2, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    with torch.no_grad():
        out = tiny.denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, 2, 16, 4, 6),
            encoder_hidden_states=conds["encoder_hidden_states"], pooled_projections=conds["pooled_projections"],
            timestep=torch.tensor([0.3, 0.7]), guidance=torch.tensor([2.5, 2.5]),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32),
            txt_ids=torch.zeros(16, 3), return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(out, 32, 48, 8)
    want = ((pred - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(got, want, atol=1e-6)
    # the guidance value reaches the guidance embedding
    with_objective(tiny, guidance_scale=5.0)
    other = family.training_loss(tiny, {"latents": latents}, conds, torch.Generator().manual_seed(5),
                                 timesteps=torch.tensor([300, 700]))
    assert not torch.allclose(got, other)


def test_t5_attention_mask_makes_the_padding_irrelevant(tiny):
    latents = torch.randn(1, 16, 4, 4)
    losses = {}
    for masked in (False, True):
        for tokens in (8, 24):
            with_objective(tiny, t5_tokens=tokens, apply_t5_attn_mask=masked)
            conds = family.encode_prompts(tiny, ["a dog"])
            losses[masked, tokens] = family.training_loss(tiny, {"latents": latents}, conds,
                                                          torch.Generator().manual_seed(2),
                                                          timesteps=torch.tensor([500]))
    assert torch.allclose(losses[True, 8], losses[True, 24], atol=1e-6)
    assert not torch.allclose(losses[False, 8], losses[False, 24], atol=1e-4)


def test_samples_follow_the_seed_and_the_guidance_embedding(tiny):
    with_objective(tiny)
    kw = dict(width=32, height=32, steps=3)
    a = family.sample(tiny, "a dog", seed=7, **kw)
    assert a.size == (32, 32)
    assert a.tobytes() == family.sample(tiny, "a dog", seed=7, **kw).tobytes()
    assert a.tobytes() != family.sample(tiny, "a dog", seed=8, **kw).tobytes()
    assert a.tobytes() != family.sample(tiny, "a dog", seed=7, extra={"g": "1.0"}, **kw).tobytes()
    # true CFG only when asked (kohya's FLUX default scale is 1)
    assert family.sample_defaults(tiny) == {"scale": 1.0}
    assert a.tobytes() != family.sample(tiny, "a dog", "blurry", seed=7, guidance_scale=4.0, **kw).tobytes()


def test_schnell_files_name_schnell_and_carry_kohyas_flux_keys(tiny):
    cfg = SimpleNamespace(network=SimpleNamespace(type="lora"))
    with_objective(tiny, timestep_sampling="shift", discrete_flow_shift=3.1582)
    meta = family.metadata(tiny, cfg)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"]) == ("shift", "3.1582")
    tiny.info["is_schnell"] = True
    try:
        assert family.metadata(tiny, SimpleNamespace(network=SimpleNamespace(type="qrlora")))[
            "modelspec.architecture"] == "flux-1-schnell/qrlora"
    finally:
        tiny.info["is_schnell"] = False


def test_freed_text_encoders_answer_from_the_kept_prompts():
    models = family.load(SimpleNamespace(pretrained="builtin:tiny-flux"), "cpu", torch.float32)
    with_objective(models)
    before = family.encode_prompts(models, ["a dog", ""])
    family.release_text_encoders(models, ["a dog", "", "a dog"])
    assert models.text_encoders == []
    after = family.encode_prompts(models, ["a dog", ""])
    for key in before:
        assert torch.equal(before[key], after[key]), key
    with pytest.raises(ValueError, match="'a cat' was not encoded before"):
        family.encode_prompts(models, ["a cat"])
