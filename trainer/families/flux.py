"""FLUX.1 (dev and schnell): diffusers FluxTransformer2DModel + CLIP-L + T5-XXL + the 16-channel AE,
trained with rectified flow as kohya's ``flux_train_network.py`` does.

Conventions (checked against kohya's ``flux_train_network.py``, ``library/strategy_flux.py`` and
``library/flux_train_utils.py``, and diffusers' ``FluxPipeline``; the maths is in ``trainer.flow``):
- Text: CLIP-L's pooled output (77 tokens) feeds ``pooled_projections``; T5's last hidden state
  (``t5xxl_max_token_length`` tokens, 512 for dev and 256 for schnell by default) feeds
  ``encoder_hidden_states``. With ``apply_t5_attn_mask`` the padding is masked in T5 and in
  every attention of the transformer (text keys masked, image keys kept), as kohya does.
- Latents: (AE sample - shift_factor) x scaling_factor, packed 2x2 into tokens.
- Training: noise level σ from ``timestep_sampling``, x_σ = (1-σ)·x₀ + σ·ε, the transformer
  reads σ and (dev) the constant ``guidance_scale`` (3.5 by default), its output goes through
  ``model_prediction_type`` and is compared with ε - x₀ by a per-sample MSE. Min-SNR and the
  noise offset are DDPM ideas that kohya's FLUX trainer ignores; so does this one, with a warning.
- Samples: flow Euler from σ = 1 to 0 on FLUX.1-dev's resolution-shifted schedule (schnell:
  the plain one), the guidance embedding set to ``--g`` (else ``flux.sample_guidance_scale``),
  true CFG only when a prompt sets ``--l`` above 1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from qrlora.archs.flux import Flux

from .. import flow
from . import BUILTIN_PREFIX, ModelFamily, Models, register

TINY = "tiny-flux"
CLIP_TOKENS = 77
DEV_GUIDANCE = 3.5  # kohya's --guidance_scale default
T5_TOKENS = {"dev": 512, "schnell": 256}  # kohya's t5xxl_max_token_length defaults


@dataclass(frozen=True)
class FlowObjective:
    """The [flux] options a run trains with, resolved for this model."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "raw"
    guidance_scale: float | None = DEV_GUIDANCE  # None: the model has no guidance embedding (schnell)
    t5_tokens: int = 512
    apply_t5_attn_mask: bool = False
    sample_guidance_scale: float = DEV_GUIDANCE


def objective_for(flux_cfg: Any, is_schnell: bool) -> tuple[FlowObjective, list[str]]:
    """The objective of ``[flux]`` on this model, and the warnings it earns."""
    warnings = []
    guidance = flux_cfg.guidance_scale
    if is_schnell:
        if guidance is not None:
            warnings.append(f"flux.guidance_scale = {guidance} is ignored: FLUX.1-schnell is not guidance-distilled"
                            " (its transformer has no guidance embedding, guidance_in), so there is no guidance"
                            " value to train with; remove the setting (it is meant for FLUX.1-dev)")
        guidance = None
    elif guidance is None:
        guidance = DEV_GUIDANCE
    tokens = flux_cfg.t5xxl_max_token_length or T5_TOKENS["schnell" if is_schnell else "dev"]
    return FlowObjective(flux_cfg.timestep_sampling, flux_cfg.sigmoid_scale, flux_cfg.discrete_flow_shift,
                         flux_cfg.model_prediction_type, guidance, tokens, flux_cfg.apply_t5_attn_mask,
                         flux_cfg.sample_guidance_scale), warnings


def _objective(models: Models) -> FlowObjective:
    # configure() sets it from [flux]; a model loaded without a config trains with the defaults
    if "objective" not in models.info:
        schnell = models.info.get("is_schnell", False)
        models.info["objective"] = FlowObjective(guidance_scale=None if schnell else DEV_GUIDANCE,
                                                 t5_tokens=T5_TOKENS["schnell" if schnell else "dev"])
    return models.info["objective"]


def attention_mask(t5_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """(B, 1, 1, text + image) boolean key mask for every attention: T5 padding off, image on."""
    keep = t5_mask.to(torch.bool)
    image = torch.ones(keep.shape[0], image_tokens, dtype=torch.bool, device=keep.device)
    return torch.cat([keep, image], dim=1)[:, None, None, :]


@register
class FluxFamily(ModelFamily):
    name = "flux"
    builtin_models = (TINY,)
    samplers = ()  # every sample uses the flow Euler sampler (kohya's FLUX sampling ignores the name too)
    frees_text_encoders = True  # T5-XXL is ~9.5 GB: once the captions are cached it is dropped

    # ----------------------------------------------------------------- loading
    def recognises(self, pretrained: str) -> bool:
        from qrlora.checkpoint import read_header

        from .flux_load import is_diffusers_flux

        if pretrained == BUILTIN_PREFIX + TINY:
            return True
        if os.path.isdir(pretrained):
            return is_diffusers_flux(pretrained)
        if pretrained.endswith(".safetensors") and os.path.isfile(pretrained):
            return Flux().detect(read_header(pretrained)[0].keys())
        return False

    def load(self, model_cfg: Any, device, weight_dtype: torch.dtype, run: Any = None) -> Models:
        from .flux_load import load_flux

        network = getattr(run, "network", None)
        # offloaded text encoders never touch the GPU: everything is read into CPU memory and
        # only the transformer and the AE move to the device
        offload = bool(getattr(getattr(run, "flux", None), "offload_text_encoders", False))
        # a plain LoRA baseline needs no basis, so an fp8-only file is fine for it
        parts = load_flux(model_cfg, "cpu" if offload else device, weight_dtype,
                          fp8_base=bool(getattr(model_cfg, "fp8_base", False)),
                          needs_basis=network is None or network.type == "qrlora",
                          rank=getattr(network, "rank", None), targets=getattr(network, "targets", None))
        if offload:
            parts.transformer.to(device)
            parts.vae.to(device)
        info = dict(parts.info)
        info.update(base_weight=parts.base_weight, is_schnell=parts.is_schnell)
        tokenizer = info.get("tokenizer")
        return Models(
            family=self.name,
            denoiser=parts.transformer,
            vae=parts.vae,
            text_encoders=[parts.clip, parts.t5],
            tokenizers=[parts.clip_tokenizer, parts.t5_tokenizer],
            noise_scheduler=None,  # rectified flow needs no scheduler object (trainer.flow)
            basis_source=parts.basis_source,
            identity=parts.identity,
            weight_dtype=weight_dtype,
            vae_dtype=info.get("vae_dtype", weight_dtype),
            device=torch.device(device),
            tokenizer_source=info.get("tokenizer_source", str(tokenizer)),
            tokenizer=tokenizer,
            info=info,
        )

    def check_files(self, cfg: Any) -> None:
        """Raise a UserError for what loading would refuse, from headers alone (preflight, --dry-run)."""
        from .flux_load import check_files

        network = cfg.network
        check_files(cfg.model, needs_basis=network.type == "qrlora", rank=network.rank, targets=network.targets)

    def configure(self, models: Models, cfg: Any) -> list[str]:
        objective, warnings = objective_for(cfg.flux, models.info["is_schnell"])
        models.info["objective"] = objective
        t = cfg.training
        if t.min_snr_gamma:
            warnings.append("training.min_snr_gamma does not apply to FLUX and is ignored: min-SNR weighting is"
                            " defined on a DDPM noise schedule, and rectified flow has none (kohya's FLUX trainer"
                            " ignores it too)")
        if t.noise_offset:
            warnings.append("training.noise_offset does not apply to FLUX and is ignored: rectified flow trains on"
                            " plain Gaussian noise (kohya's FLUX trainer ignores it too)")
        if getattr(cfg.network, "train_text_encoder", False):
            warnings.append("network.train_text_encoder is ignored for FLUX: only the transformer is adapted"
                            " (CLIP-L and T5 stay frozen, as in kohya's default FLUX LoRA training)")
        # the text outputs depend on these as much as on the tokenizer: part of the text-cache key
        mask = "masked" if objective.apply_t5_attn_mask else "unmasked"
        models.tokenizer_source = f"{models.tokenizer_source}; T5 {objective.t5_tokens} tokens, {mask}"
        return warnings

    # ----------------------------------------------------------------- layers
    def trainable_modules(self, models: Models, include_text_encoders: bool) -> dict[str, torch.nn.Linear]:
        out = {}
        for path, module in models.denoiser.named_modules():
            if isinstance(module, torch.nn.Linear) and path.startswith(("transformer_blocks.", "single_transformer_blocks.")):
                out["transformer." + path] = module
        return out  # the text encoders are not trained for FLUX (as kohya's default, train_t5xxl off)

    def targets(self, models: Models) -> list:
        if "targets" not in models.info:  # from the loaded module's shapes, on the meta device (no copies)
            from qrlora.archs.flux import diffusers_to_bfl

            meta = {k: torch.empty(v.shape, device="meta") for k, v in models.denoiser.state_dict().items()}
            models.info["targets"] = Flux().linear_targets({k: tuple(v.shape) for k, v in diffusers_to_bfl(meta).items()})
        return models.info["targets"]

    def base_weight(self, models: Models, name: str) -> torch.Tensor:
        weight = models.info["base_weight"](name)
        if weight is None:
            raise ValueError(f"{name}: no 16-bit base weight to compute the basis from")
        return weight

    # ----------------------------------------------------------------- training
    def encode_prompts(self, models: Models, captions: Sequence[str], with_grad: bool = False) -> dict[str, torch.Tensor]:
        kept = models.info.get("kept_prompts")
        if kept is not None:  # the encoders were freed after caching: only prompts kept then exist
            return self.kept_prompts(models, captions)
        clip, t5 = models.text_encoders
        clip_tok, t5_tok = models.tokenizers
        objective = _objective(models)
        captions = list(captions)
        clip_ids = clip_tok(captions, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
        t5_batch = t5_tok(captions, padding="max_length", max_length=objective.t5_tokens, truncation=True,
                          return_tensors="pt")
        t5_mask = t5_batch.attention_mask
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            pooled = clip(clip_ids.to(clip.device)).pooler_output
            hidden = t5(t5_batch.input_ids.to(t5.device),
                        attention_mask=t5_mask.to(t5.device) if objective.apply_t5_attn_mask else None).last_hidden_state
        device = models.device
        return {"pooled_projections": pooled.to(device), "encoder_hidden_states": hidden.to(device),
                "t5_attention_mask": t5_mask.to(device)}

    def velocity(self, models: Models, packed: torch.Tensor, sigmas: torch.Tensor, conds: dict[str, torch.Tensor],
                 latent_hw: tuple[int, int], guidance: float | None) -> torch.Tensor:
        """The transformer's output on packed tokens at noise levels ``sigmas`` (B,)."""
        transformer, dtype, device = models.denoiser, models.weight_dtype, models.device
        b, text_len = packed.shape[0], conds["encoder_hidden_states"].shape[1]
        kwargs = {}
        if _objective(models).apply_t5_attn_mask:
            kwargs["joint_attention_kwargs"] = {"attention_mask": attention_mask(conds["t5_attention_mask"].to(device),
                                                                                 packed.shape[1])}
        has_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
        return transformer(
            hidden_states=packed.to(device, dtype),
            encoder_hidden_states=conds["encoder_hidden_states"].to(device, dtype),
            pooled_projections=conds["pooled_projections"].to(device, dtype),
            timestep=sigmas.to(device, dtype),
            img_ids=flow.image_ids(*latent_hw, device=device),
            txt_ids=flow.text_ids(text_len, device=device),
            guidance=torch.full((b,), DEV_GUIDANCE if guidance is None else float(guidance), device=device, dtype=dtype)
            if has_guidance else None,
            return_dict=False,
            **kwargs,
        )[0]

    def training_loss(self, models, batch, conds, generator=None, noise_offset=0.0, min_snr_gamma=None, timesteps=None):
        """Per-sample loss; ``timesteps`` (kohya's σ·1000) fixes the noise levels. ``noise_offset`` and
        ``min_snr_gamma`` do not apply to rectified flow (``configure`` warns when they are set)."""
        objective, device = _objective(models), models.device
        latents = batch.get("latents")
        if latents is None:
            latents = self.encode_images(models, batch["pixels"], generator)
        latents = latents.to(device, torch.float32)
        b, _, h, w = latents.shape
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(latents.shape, generator=generator, device=gen_device).to(device)
        if timesteps is None:
            sigmas = flow.sample_sigmas(objective.timestep_sampling, b, (h, w), generator, objective.sigmoid_scale,
                                        objective.discrete_flow_shift)
        else:
            sigmas = timesteps.float() / flow.NUM_TRAIN_TIMESTEPS
        sigmas = sigmas.to(device, torch.float32)
        noisy = flow.noisy_latents(latents, noise, sigmas)
        packed_pred = self.velocity(models, flow.pack_latents(noisy), sigmas, conds, (h, w), objective.guidance_scale)
        pred = flow.unpack_latents(packed_pred.float(), h, w)
        pred = flow.apply_prediction_type(objective.model_prediction_type, pred, noisy, sigmas)
        target = flow.velocity_target(latents, noise)
        return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))

    # ----------------------------------------------------------------- saving
    def metadata(self, models: Models, cfg: Any) -> dict[str, str]:
        """kohya's FLUX keys, and the schnell architecture where it applies."""
        o = _objective(models)
        meta = {
            "ss_model_type": "flux",
            "ss_guidance_scale": str(o.guidance_scale if o.guidance_scale is not None else 0.0),
            "ss_timestep_sampling": o.timestep_sampling,
            "ss_sigmoid_scale": str(o.sigmoid_scale),
            "ss_model_prediction_type": o.model_prediction_type,
            "ss_discrete_flow_shift": str(o.discrete_flow_shift),
            "ss_apply_t5_attn_mask": str(o.apply_t5_attn_mask),
            "ss_t5xxl_max_token_length": str(o.t5_tokens),
        }
        variant = "schnell" if models.info.get("is_schnell") else "dev"
        kind = "qrlora" if cfg.network.type == "qrlora" else "lora"
        meta["modelspec.architecture"] = f"flux-1-{variant}/{kind}"  # kohya's sai_model_spec names
        return meta

    # ----------------------------------------------------------------- sampling
    def default_size(self, models: Models) -> tuple[int, int]:
        size = int(getattr(models.vae.config, "sample_size", 1024))
        return size, size

    def sample_defaults(self, models: Models) -> dict[str, Any]:
        return {"scale": 1.0}  # kohya's FLUX default: no true CFG unless a prompt asks for it (--l)

    def sample(self, models, prompt, negative_prompt="", width=None, height=None, steps=20, guidance_scale=1.0,
               seed=None, sampler="euler", extra=None):
        from PIL import Image

        objective, device = _objective(models), models.device
        extra = extra or {}
        embedded = None if models.info.get("is_schnell") else float(extra.get("g", objective.sample_guidance_scale))
        w0, h0 = self.default_size(models)
        # latents are 1/8 of the image and packed 2x2: sizes round down to multiples of 16
        width, height = (max(16, v - v % 16) for v in (width or w0, height or h0))
        lh, lw = height // 8, width // 8
        generator = torch.Generator("cpu").manual_seed(secrets.randbits(31) if seed is None else int(seed))
        cfg = guidance_scale is not None and guidance_scale > 1.0
        conds = self.encode_prompts(models, [negative_prompt or "", prompt] if cfg else [prompt])
        channels = models.denoiser.config.in_channels // 4
        x = flow.pack_latents(torch.randn((1, channels, lh, lw), generator=generator)).to(device)
        sigmas = flow.sampling_sigmas(steps, x.shape[1], shift=not models.info.get("is_schnell"))

        def velocity(tokens, sigma):
            n = 2 if cfg else 1
            out = self.velocity(models, tokens.repeat(n, 1, 1), torch.full((n,), sigma, device=device), conds,
                                (lh, lw), embedded).float()
            if cfg:
                uncond, cond = out.chunk(2)
                return uncond + guidance_scale * (cond - uncond)
            return out

        with torch.no_grad():
            x = flow.euler_flow(velocity, x, sigmas)
            vae = models.vae
            latents = flow.unpack_latents(x, lh, lw)
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            image = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.device, vae.dtype)).sample
        array = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)
