"""Rectified flow for FLUX.1: the pure maths, with no model in sight.

FLUX is trained on x_σ = (1 - σ)·x₀ + σ·ε with the velocity target ε - x₀, on latents packed
2x2 into tokens. Each function here states one convention and was checked against kohya's
``library/flux_train_utils.py`` (``get_noisy_model_input_and_timesteps``,
``apply_model_prediction_type``, ``get_schedule``/``denoise``) and ``library/flux_utils.py``
(``pack_latents``, ``prepare_img_ids``), and against diffusers' ``FluxPipeline`` (the same
packing and ids, ``calculate_shift``):

- packing: (B, C, H, W) -> (B, H/2·W/2, 4C), channel-major within a token (c, row, col);
- image position ids: (0, row, col) per token; text ids: zeros;
- the timestep the transformer reads is σ (diffusers' model multiplies it by 1000, as BFL's
  ``timestep_embedding`` does), and kohya's "timesteps" are σ·1000;
- the resolution-dependent shift: μ linear in the token count, 0.5 at 256 tokens, 1.15 at
  4096 (FLUX.1-dev's schedule), σ' = e^μ / (e^μ + 1/σ - 1).
"""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000  # kohya's FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")


# ----------------------------------------------------------------- packing and ids
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): each 2x2 patch becomes one token."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2·w/2, 3) position ids of the packed tokens of an h x w latent: (0, row, col)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(rows, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=dtype, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, 3) position ids of the text tokens: all zero (RoPE leaves them unrotated)."""
    return torch.zeros(length, 3, dtype=dtype, device=device)


# ----------------------------------------------------------------- the shift
def resolution_mu(tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX.1-dev's μ for an image of ``tokens`` packed tokens: linear through (256, 0.5)
    and (4096, 1.15)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (tokens - 256)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """σ' = e^μ / (e^μ + (1/σ - 1)): more steps at high noise for larger images."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def discrete_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed shift s·σ / (1 + (s - 1)·σ) (``discrete_flow_shift``)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


# ----------------------------------------------------------------- training
def sample_sigmas(kind: str, batch: int, latent_hw: tuple[int, int], generator: torch.Generator | None = None,
                  sigmoid_scale: float = 1.0, flow_shift: float = 3.0) -> torch.Tensor:
    """(B,) noise levels σ in (0, 1] drawn as kohya's ``timestep_sampling`` does:

    - ``sigma``: one of the 1000 levels of the shifted discrete schedule, uniformly
      (kohya's default, weighting scheme "uniform"; ``discrete_flow_shift`` applies);
    - ``uniform``: σ ~ U(0, 1);
    - ``sigmoid``: σ = sigmoid(scale·N(0, 1));
    - ``shift``: the sigmoid draw, then ``discrete_shift`` by ``discrete_flow_shift``;
    - ``flux_shift``: the sigmoid draw, then ``time_shift`` with μ of this latent size.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if kind == "sigma":
        index = (torch.rand(batch, generator=generator, device=gen_device) * NUM_TRAIN_TIMESTEPS).long()
        base = (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS
        return discrete_shift(base, flow_shift)
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=gen_device)
    if kind not in ("sigmoid", "shift", "flux_shift"):
        raise ValueError(f"unknown timestep_sampling {kind!r}; known: {', '.join(TIMESTEP_SAMPLING)}")
    sigmas = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator, device=gen_device))
    if kind == "shift":
        return discrete_shift(sigmas, flow_shift)
    if kind == "flux_shift":
        h, w = latent_hw
        return time_shift(resolution_mu((h // 2) * (w // 2)), sigmas)
    return sigmas


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 - σ)·x₀ + σ·ε, σ per sample."""
    s = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict: ε - x₀ (dx_σ/dσ)."""
    return noise - latents


def apply_prediction_type(kind: str, prediction: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """kohya's ``model_prediction_type``: ``raw`` uses the output as it is; ``additive`` adds
    the noisy input; ``sigma_scaled`` returns x_σ - σ·output. kohya compares all three with
    the same target ε - x₀, and so does this trainer (``sigma_scaled`` is then an estimate
    of x₀ compared with a velocity, which is why kohya's guide recommends ``raw``)."""
    if kind == "raw":
        return prediction
    if kind == "additive":
        return prediction + noisy
    if kind == "sigma_scaled":
        s = sigmas.reshape(-1, *([1] * (prediction.ndim - 1))).to(prediction)
        return prediction * (-s) + noisy
    raise ValueError(f"unknown model_prediction_type {kind!r}; known: {', '.join(PREDICTION_TYPES)}")


# ----------------------------------------------------------------- sampling
def sampling_sigmas(steps: int, tokens: int, shift: bool = True) -> list[float]:
    """``steps`` + 1 noise levels from 1 down to 0, time-shifted for ``tokens`` packed tokens
    (FLUX.1-dev's schedule; schnell was distilled on the unshifted one)."""
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        mu = resolution_mu(tokens)
        inner = time_shift(mu, sigmas[:-1])  # σ = 0 stays 0 (1/σ is infinite there)
        sigmas = torch.cat([inner, sigmas[-1:]])
    return [float(s) for s in sigmas]


def euler_flow(velocity, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Integrate dx/dσ = v(x, σ) from σ₀ to σ_N with Euler steps; ``velocity(x, sigma)``."""
    for current, following in zip(sigmas[:-1], sigmas[1:]):
        x = x + (following - current) * velocity(x, current)
    return x
