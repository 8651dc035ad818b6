"""SDXL: diffusers UNet + CLIP-L + OpenCLIP-bigG (as HF CLIP) + VAE, trained as kohya does.

Conventions (checked against kohya's ``strategy_sdxl.py``/``custom_train_functions.py`` and
diffusers' SDXL pipeline):
- Tokens: 77 per encoder, padded to ``max_length``; tokenizer 1 (CLIP-L) pads with
  ``<|endoftext|>``, tokenizer 2 (bigG) with ``!`` (id 0), as the hub tokenizers do and as
  kohya forces (``tokenizer2.pad_token_id = 0``).
- Text conditioning: each encoder's penultimate hidden state (``hidden_states[-2]``),
  concatenated on the feature axis (768 + 1280 = 2048); pooled = bigG's final-layer-normed
  state at the first end token, through ``text_projection`` (kohya's EOS-position pooling,
  equal to transformers' ``text_embeds`` for standard ids).
- Micro-conditioning ``time_ids`` = original (h, w), crop (top, left), target (h, w).
- Latents: VAE sample × ``scaling_factor`` (0.13025). The VAE stays float32 when the weights
  are fp16: SDXL's VAE overflows to NaN in fp16 (bf16 is fine).
- Training: DDPM noise schedule (scaled_linear 0.00085–0.012, 1000 steps), timesteps uniform
  in [0, 1000), noise offset ``offset·N(0,1)`` per (sample, channel), epsilon target or
  velocity for v-prediction, per-sample MSE, min-SNR-γ weight min(SNR, γ)/SNR (/(SNR+1) for v).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from qrlora.archs.sdxl import SDXL
from qrlora.checkpoint import SafetensorsFile, read_header

from ..cache import weights_identity
from . import BUILTIN_PREFIX, ModelFamily, Models, cache_root, register
from . import sdxl_load as L
from ..tokenizers import EOS, MAX_LENGTH, resolve_clip_tokenizers

TINY = "tiny-sdxl"
PAD_TOKENS = (EOS, "!")  # tokenizer 1, tokenizer 2

# kohya's sampler names -> diffusers scheduler class names (and extra config)
SAMPLERS = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}

_UNET_TARGET = (
    "proj_in", "proj_out",
    *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj", "ff.net.2",
)
_TE_TARGET = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """kohya's min-SNR-γ loss weight per sample: SNR = ᾱ/(1-ᾱ); min(SNR, γ)/SNR, or
    min(SNR, γ)/(SNR+1) for v-prediction."""
    ac = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = ac / (1 - ac)
    return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v_prediction else snr)


def time_ids(batch: dict[str, Any], batch_size: int, size_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning from a batch: original (h, w), crop (top, left), target
    (h, w). Our batch keys, or kohya's; absent ones mean "uncropped, at this size"."""

    def pairs(names: tuple[str, ...], default: tuple[int, int]) -> torch.Tensor:
        for name in names:
            if batch.get(name) is not None:
                return torch.as_tensor(batch[name], dtype=torch.float32).reshape(batch_size, 2)
        return torch.tensor([default] * batch_size, dtype=torch.float32)

    return torch.cat([
        pairs(("original_size", "original_sizes_hw"), size_hw),
        pairs(("crop_top_left", "crop_top_lefts"), (0, 0)),
        pairs(("target_size", "target_sizes_hw"), size_hw),
    ], dim=1)


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name.endswith("." + s) for s in suffixes)


@register
class SDXLFamily(ModelFamily):
    name = "sdxl"
    builtin_models = (TINY,)
    samplers = tuple(SAMPLERS)

    # ----------------------------------------------------------------- loading
    def recognises(self, pretrained: str) -> bool:
        if pretrained == BUILTIN_PREFIX + TINY:
            return True
        if os.path.isdir(pretrained):
            return L.is_diffusers_sdxl(pretrained)
        if pretrained.endswith(".safetensors") and os.path.isfile(pretrained):
            return SDXL().detect(read_header(pretrained)[0].keys())
        return False

    def load(self, model_cfg: Any, device, weight_dtype: torch.dtype, run: Any = None) -> Models:
        pretrained = model_cfg.pretrained
        config_dir = getattr(model_cfg, "config_dir", None)
        vae_path = getattr(model_cfg, "vae", None)
        device = torch.device(device)
        # SDXL's VAE produces NaN in fp16; bf16 has fp32's range and is fine.
        vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
        builtin = pretrained.startswith(BUILTIN_PREFIX)
        if builtin:
            if pretrained != BUILTIN_PREFIX + TINY:
                raise ValueError(f"unknown built-in SDXL model {pretrained!r}; built-in: {BUILTIN_PREFIX + TINY}")
            pretrained, tiny_configs = self.tiny_model()
            config_dir = config_dir or tiny_configs

        info: dict[str, Any] = {}
        if os.path.isdir(pretrained):
            mods = L.load_folder(pretrained, device, weight_dtype, vae_dtype, skip_vae=bool(vae_path))
            weight_files = [f for c in ("unet", "text_encoder", "text_encoder_2", "vae")
                            for f in L.component_weight_files(os.path.join(pretrained, c))]
            info["reader"] = L.folder_weight_reader(pretrained)
            basis_source, model_dir, vae_config = None, pretrained, None
        else:
            shapes = SafetensorsFile(pretrained).shapes()
            configs = L.configs_for_file(pretrained, shapes, config_dir)
            mods = L.load_sgm(pretrained, configs, device, weight_dtype, vae_dtype, skip_vae=bool(vae_path))
            weight_files, basis_source, model_dir, vae_config = [pretrained], pretrained, None, configs.vae
            info["targets"] = SDXL().linear_targets(shapes)
            info["configs"] = configs.source
        if vae_path:
            if vae_config is None:  # folder model: its own VAE's config describes the override
                from diffusers import AutoencoderKL

                vae_config = dict(AutoencoderKL.load_config(os.path.join(pretrained, "vae")))
            mods["vae"] = L.load_vae(vae_path, vae_config, device, vae_dtype)
            weight_files += L.component_weight_files(vae_path) if os.path.isdir(vae_path) else [vae_path]

        tokenizers, tok_choice = resolve_clip_tokenizers(
            PAD_TOKENS, getattr(model_cfg, "tokenizer", None), model_dir, cache_root("tokenizers"), builtin_tiny=builtin
        )
        from diffusers import DDPMScheduler

        # a single file's schedule (v-prediction above all) travels in its config_dir's scheduler/
        sched_cfg = L.scheduler_config(model_dir or config_dir, getattr(model_cfg, "prediction_type", None))
        return Models(
            family=self.name,
            denoiser=mods["unet"],
            vae=mods["vae"],
            text_encoders=[mods["text_encoder"], mods["text_encoder_2"]],
            tokenizers=tokenizers,
            noise_scheduler=DDPMScheduler.from_config(sched_cfg),
            basis_source=basis_source,
            identity=f"sdxl-{weights_identity(weight_files)}" if weight_files else f"sdxl-path:{os.path.abspath(pretrained)}",
            weight_dtype=weight_dtype,
            vae_dtype=vae_dtype,
            device=device,
            tokenizer_source=str(tok_choice),
            tokenizer=tok_choice,
            info=info,
        )

    @staticmethod
    def tiny_model() -> tuple[str, str]:
        """(checkpoint, config dir) of the built-in tiny SDXL, written once into the cache."""
        from qrlora.tiny import make_tiny
        from qrlora.tiny.sdxl import CHECKPOINT_NAME

        folder = cache_root("tiny", "sdxl-seed0")
        checkpoint, configs = os.path.join(folder, CHECKPOINT_NAME), os.path.join(folder, "config")
        if not os.path.isfile(os.path.join(configs, "text_encoder_2", "config.json")):
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp-")
            try:
                make_tiny("sdxl", tmp, seed=0)
                try:
                    os.rename(tmp, folder)  # atomic: other ranks see all of it or nothing
                except OSError:
                    if not os.path.isfile(checkpoint):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return checkpoint, configs

    # ----------------------------------------------------------------- layers
    def trainable_modules(self, models: Models, include_text_encoders: bool) -> dict[str, torch.nn.Linear]:
        out = {}
        for path, module in models.denoiser.named_modules():
            if isinstance(module, torch.nn.Linear) and ".attentions." in path and _matches(path, _UNET_TARGET):
                out["unet." + path] = module
        if include_text_encoders:
            for part, encoder in zip(("te1", "te2"), models.text_encoders):
                for path, module in encoder.named_modules():
                    if isinstance(module, torch.nn.Linear) and ".layers." in path and _matches(path, _TE_TARGET):
                        # transformers 5's CLIPTextModel has no text_model level; our names do
                        name = path if path.startswith("text_model.") else "text_model." + path
                        out[f"{part}.{name}"] = module
        return out

    def targets(self, models: Models) -> list:
        if "targets" not in models.info:
            models.info["targets"] = L.sgm_targets_from_modules(models.denoiser, *models.text_encoders)
        return models.info["targets"]

    def base_weight(self, models: Models, name: str) -> torch.Tensor:
        if models.basis_source:
            if "basis_file" not in models.info:  # opened once: the header of a real file is large
                models.info["targets_by_name"] = {t.name: t for t in self.targets(models)}
                models.info["basis_file"] = SafetensorsFile(models.basis_source)
            ckpt, target = models.info["basis_file"], models.info["targets_by_name"][name]
            weight = ckpt.tensor(target.key)
            return weight[target.rows[0] : target.rows[1]] if target.rows else weight
        weight = models.info["reader"](name)
        if weight is None:  # weights not in safetensors files: the loaded copy, before casting
            raise ValueError(f"{name}: cannot read the stored base weight; convert the model's weights to safetensors")
        return weight

    # ----------------------------------------------------------------- training
    def encode_prompts(self, models: Models, captions: Sequence[str], with_grad: bool = False) -> dict[str, torch.Tensor]:
        te1, te2 = models.text_encoders
        tok1, tok2 = models.tokenizers

        def ids(tok, encoder):
            batch = tok(list(captions), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
            return batch.input_ids.to(encoder.device)

        ids1, ids2 = ids(tok1, te1), ids(tok2, te2)
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            hidden1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
            out2 = te2(ids2, output_hidden_states=True)
            hidden2 = out2.hidden_states[-2]
            # the first end token (tokenizer 2 pads with "!", so there is one unless truncated)
            eos = (ids2 == tok2.eos_token_id).int().argmax(dim=1)
            last = out2.last_hidden_state[torch.arange(ids2.shape[0], device=ids2.device), eos]
            pooled = te2.text_projection(last.to(te2.text_projection.weight.dtype))
        return {"encoder_hidden_states": torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1), "text_embeds": pooled}

    def vae_scale_factor(self, models: Models) -> int:
        return 2 ** (len(models.vae.config.block_out_channels) - 1)

    def training_loss(self, models, batch, conds, generator=None, noise_offset=0.0, min_snr_gamma=None, timesteps=None):
        unet, sched = models.denoiser, models.noise_scheduler
        device, dtype = unet.device, unet.dtype
        latents = batch.get("latents")
        if latents is None:
            latents = self.encode_images(models, batch["pixels"], generator)
        latents = latents.to(device, torch.float32)
        b, c = latents.shape[:2]
        gen_device = generator.device if generator is not None else torch.device("cpu")

        noise = torch.randn(latents.shape, generator=generator, device=gen_device).to(device)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=gen_device).to(device)
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator, device=gen_device)
        timesteps = timesteps.to(device).long()
        noisy = sched.add_noise(latents, noise, timesteps)

        factor = self.vae_scale_factor(models)
        ids = time_ids(batch, b, (latents.shape[2] * factor, latents.shape[3] * factor))
        pred = unet(
            noisy.to(dtype), timesteps,
            encoder_hidden_states=conds["encoder_hidden_states"].to(device, dtype),
            added_cond_kwargs={"text_embeds": conds["text_embeds"].to(device, dtype), "time_ids": ids.to(device, dtype)},
        ).sample
        prediction = sched.config.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"prediction type {prediction!r} is not supported (epsilon or v_prediction)")
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma:
            loss = loss * min_snr_weight(sched.alphas_cumprod, timesteps, min_snr_gamma, prediction == "v_prediction")
        return loss

    # ----------------------------------------------------------------- sampling
    def default_size(self, models: Models) -> tuple[int, int]:
        size = int(models.denoiser.config.sample_size) * self.vae_scale_factor(models)
        return size, size

    def sample(self, models, prompt, negative_prompt="", width=None, height=None, steps=30, guidance_scale=7.5,
               seed=None, sampler="euler_a", extra=None):
        from PIL import Image

        factor = self.vae_scale_factor(models)
        w0, h0 = self.default_size(models)
        # like kohya: round down to what the VAE can represent
        width, height = (max(factor, v - v % factor) for v in (width or w0, height or h0))
        generator = torch.Generator("cpu").manual_seed(secrets.randbits(31) if seed is None else int(seed))
        image = self.sample_images(models, [prompt], [generator], width, height, steps, guidance_scale, sampler,
                                   negative_prompt)
        array = ((image[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)

    def sample_images(self, models, prompts, generators, width, height, steps, guidance_scale, sampler="euler_a",
                      negative_prompt="") -> torch.Tensor:
        """(N, 3, H, W) float images in [-1, 1] for N prompts at once, image i drawn with
        generators[i] alone (its initial noise and, for ancestral samplers, every step's), so
        it equals the same prompt sampled by itself. ``width``/``height``: multiples of the VAE factor."""
        import diffusers

        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        cls_name, extra = SAMPLERS[sampler]
        scheduler = getattr(diffusers, cls_name).from_config(models.noise_scheduler.config, **extra)
        unet, vae = models.denoiser, models.vae
        device, dtype = unet.device, unet.dtype
        factor = self.vae_scale_factor(models)
        b = len(prompts)
        cfg = guidance_scale > 1.0
        conds = self.encode_prompts(models, ([negative_prompt or ""] * b if cfg else []) + list(prompts))
        n = conds["text_embeds"].shape[0]
        hidden, pooled = conds["encoder_hidden_states"].to(device, dtype), conds["text_embeds"].to(device, dtype)
        ids = torch.tensor([[height, width, 0, 0, height, width]] * n, device=device, dtype=dtype)

        scheduler.set_timesteps(steps, device=device)
        shape = (1, unet.config.in_channels, height // factor, width // factor)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(torch.cat([latents] * (n // b)), t)
                pred = unet(inp.to(dtype), t, encoder_hidden_states=hidden,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()
                if cfg:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(pred, t, latents, generator=list(generators)).prev_sample
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return images.float().clamp(-1, 1)
