"""trainer.flow: FLUX's rectified-flow conventions, checked against diffusers' own FluxPipeline
and FlowMatchEulerDiscreteScheduler (the references users' samplers run) and against kohya's
formulas, restated here."""

import math

import pytest
import torch

from trainer import flow


def test_packing_and_ids_are_diffusers_fluxpipeline_s():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10)
    packed = flow.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(flow.unpack_latents(packed, 6, 10), x)
    # diffusers' unpack takes pixel sizes and the VAE factor (8): the same latent back
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), x)
    ids = flow.image_ids(6, 10)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert ids[7].tolist() == [0, 1, 2]  # token 7 of a 3x5 grid: row 1, column 2
    assert torch.equal(flow.text_ids(4), torch.zeros(4, 3))


def test_sampling_schedule_is_diffusers_dynamic_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for steps, tokens in ((4, 16), (20, 1024), (28, 4096)):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert flow.resolution_mu(tokens) == pytest.approx(mu, abs=1e-12)
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        sched.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=mu)
        ours = flow.sampling_sigmas(steps, tokens)
        assert len(ours) == steps + 1 and ours[0] == 1.0 and ours[-1] == 0.0
        assert ours == pytest.approx(sched.sigmas.tolist(), abs=1e-6)
    # schnell: the plain linear schedule
    assert flow.sampling_sigmas(4, 1024, shift=False) == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_euler_flow_steps_along_the_velocity():
    # x_σ = (1-σ)·x0 + σ·ε has the constant velocity ε - x0: Euler is exact on it
    x0, eps = torch.randn(3, 8), torch.randn(3, 8)
    out = flow.euler_flow(lambda x, s: eps - x0, eps.clone(), flow.sampling_sigmas(5, 64))
    assert torch.allclose(out, x0, atol=1e-6)


def _kohya_sigma_schedule(shift):
    # kohya's FlowMatchEulerDiscreteScheduler(1000, shift): sigmas of linspace(1, 1000)[::-1] / 1000, shifted
    t = torch.linspace(1, 1000, 1000).flip(0) / 1000
    return shift * t / (1 + (shift - 1) * t)


@pytest.mark.parametrize("kind", flow.TIMESTEP_SAMPLING)
def test_timestep_sampling_draws_what_kohya_draws(kind):
    n, scale, shift, hw = 4000, 1.3, 3.1582, (64, 64)
    got = flow.sample_sigmas(kind, n, hw, torch.Generator().manual_seed(0), sigmoid_scale=scale, flow_shift=shift)
    g = torch.Generator().manual_seed(0)
    if kind == "sigma":
        index = (torch.rand(n, generator=g) * 1000).long()
        want = _kohya_sigma_schedule(shift)[index]
    elif kind == "uniform":
        want = torch.rand(n, generator=g)
    else:
        s = torch.sigmoid(scale * torch.randn(n, generator=g))
        if kind == "shift":
            want = shift * s / (1 + (shift - 1) * s)
        elif kind == "flux_shift":
            mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (32 * 32 - 256)  # the packed 32x32 tokens
            want = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            want = s
    assert torch.allclose(got, want, atol=1e-6)
    assert got.min() > 0 and got.max() <= 1
    if kind in ("shift", "flux_shift"):  # both move mass toward high noise
        plain = flow.sample_sigmas("sigmoid", n, hw, torch.Generator().manual_seed(0), sigmoid_scale=scale)
        assert got.mean() > plain.mean() + 0.05


def test_noisy_input_target_and_prediction_types():
    x0, eps, sig = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([0.25, 0.9])
    noisy = flow.noisy_latents(x0, eps, sig)
    assert torch.allclose(noisy[1], 0.1 * x0[1] + 0.9 * eps[1])
    v = flow.velocity_target(x0, eps)
    assert torch.equal(v, eps - x0)
    pred = torch.randn_like(x0)
    assert torch.equal(flow.apply_prediction_type("raw", pred, noisy, sig), pred)
    assert torch.equal(flow.apply_prediction_type("additive", pred, noisy, sig), pred + noisy)
    scaled = flow.apply_prediction_type("sigma_scaled", pred, noisy, sig)
    assert torch.allclose(scaled[0], noisy[0] - 0.25 * pred[0]) and torch.allclose(scaled[1], noisy[1] - 0.9 * pred[1])
    # the perfect velocity makes x_σ - σ·v the clean latent
    assert torch.allclose(flow.apply_prediction_type("sigma_scaled", v, noisy, sig), x0, atol=1e-6)
    with pytest.raises(ValueError, match="model_prediction_type"):
        flow.apply_prediction_type("eps", pred, noisy, sig)
