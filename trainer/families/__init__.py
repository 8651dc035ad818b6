"""Model families: everything the trainer does differently for SDXL, FLUX, ...

The loop, data, caching, checkpointing and export never branch on the model: they call one
``ModelFamily`` (musubi-tuner's one-subclass-per-family shape, much smaller). A family is
one module in this package that defines a subclass and decorates it with ``@register``;
adding FLUX is adding ``flux.py``.

Layer names are the project's layout-independent ones (``qrlora.archs``): ``unet.…``,
``te1.text_model.…``, ``te2.text_model.…`` for SDXL; the same names ΔR and basis files use.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

BUILTIN_PREFIX = "builtin:"


def cache_root(*parts: str) -> str:
    """Where the trainer keeps derived files (tiny models, tokenizers): ``$QRLORA_CACHE`` if
    set, else ``~/.cache/qrlora``."""
    root = os.environ.get("QRLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qrlora")
    return os.path.join(root, *parts)


@dataclass
class Models:
    """The loaded components of one base model, frozen, on their device."""

    family: str  # ModelFamily.name
    denoiser: torch.nn.Module  # SDXL: diffusers UNet2DConditionModel; FLUX: the transformer
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any  # the training scheduler (SDXL: DDPMScheduler)
    basis_source: str | None  # the original-layout single file, when the weights came from one
    identity: str  # names the base weights (and VAE) for caches; content-derived, not path-derived
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    device: torch.device
    tokenizer_source: str = ""  # which tokenizer, with its digest (printed, recorded, part of text-cache keys)
    tokenizer: Any = None  # trainer.tokenizers.TokenizerChoice: kind, source, digest
    info: dict[str, Any] = field(default_factory=dict)  # family-private (readers, configs, ...)
    warnings: list[str] = field(default_factory=list)  # what ``ModelFamily.configure`` found, printed at start


class ModelFamily(abc.ABC):
    """One model family. Stateless: everything loaded lives in ``Models``."""

    name: str = ""  # "sdxl"; also the qrlora.archs architecture name
    builtin_models: tuple[str, ...] = ()  # names usable as "builtin:<name>"
    samplers: tuple[str, ...] = ()  # sampler names ``sample`` accepts (checked before training)
    # True: once the captions are cached (and the encoders are not trained) the text encoders
    # are dropped, the sample prompts' outputs kept (FLUX's T5-XXL alone is ~9.5 GB)
    frees_text_encoders: bool = False

    # ----------------------------------------------------------------- loading
    @abc.abstractmethod
    def recognises(self, pretrained: str) -> bool:
        """True if ``model.pretrained`` (builtin name, single file or folder) is this family."""

    @abc.abstractmethod
    def load(self, model_cfg: Any, device: str | torch.device, weight_dtype: torch.dtype, run: Any = None) -> Models:
        """Load the base model. ``model_cfg`` has ``pretrained`` and optional ``config_dir``,
        ``tokenizer``, ``vae``; nothing is ever downloaded. ``run`` (the whole Config, or None):
        for a loader whose needs depend on the run (FLUX: the basis for [network], where the
        text encoders live for [flux])."""

    # ----------------------------------------------------------------- layers
    @abc.abstractmethod
    def trainable_modules(self, models: Models, include_text_encoders: bool) -> dict[str, torch.nn.Linear]:
        """Every targetable Linear, by layer name, in model order (text encoders optional)."""

    @abc.abstractmethod
    def targets(self, models: Models) -> list:
        """``qrlora.archs.Target`` of every targetable layer (names as in ``trainable_modules``,
        original-layout key and rows, shape): what ΔR and basis files record."""

    @abc.abstractmethod
    def base_weight(self, models: Models, name: str) -> torch.Tensor:
        """The layer's base weight as stored in the model's file(s), in the stored dtype, rows
        already sliced: the input of ``qrlora.basis.compute_basis`` when there is no single file."""

    # ----------------------------------------------------------------- training
    @abc.abstractmethod
    def encode_prompts(self, models: Models, captions: Sequence[str], with_grad: bool = False) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions (tensors with a leading batch axis, so they
        can be cached and concatenated). ``with_grad``: the text encoders are being trained."""

    def encode_images(self, models: Models, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> the latents the denoiser is trained on (float32): a
        VAE sample, (x - shift_factor) x scaling_factor (SDXL's VAE has no shift)."""
        vae = models.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents.float() - shift) * vae.config.scaling_factor

    @abc.abstractmethod
    def training_loss(
        self,
        models: Models,
        batch: dict[str, Any],
        conds: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        noise_offset: float = 0.0,
        min_snr_gamma: float | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss (B,) for one batch; ``timesteps`` fixes them (validation, tests)."""

    # ----------------------------------------------------------------- sampling
    @abc.abstractmethod
    def sample(
        self,
        models: Models,
        prompt: str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        seed: int | None = None,
        sampler: str = "euler_a",
        extra: dict[str, str] | None = None,
    ):
        """One image (PIL.Image) for a prompt, with the adapters currently applied. ``extra``:
        the prompt's other kohya flags (``--g`` FLUX guidance, ...), for the families that use them."""

    # ----------------------------------------------------------------- per-run hooks
    def configure(self, models: Models, cfg: Any) -> list[str]:
        """Adopt the run's config (objective options of the family's own section); returns warnings."""
        return []

    def metadata(self, models: Models, cfg: Any) -> dict[str, str]:
        """Family-specific keys for the saved files' metadata (kohya's ``ss_*``, modelspec)."""
        return {}

    def sample_defaults(self, models: Models) -> dict[str, Any]:
        """Sample-prompt defaults that differ from the [sampling] section's (SamplePrompt fields)."""
        return {}

    def release_text_encoders(self, models: Models, keep: Sequence[str]) -> None:
        """Encode the captions in ``keep`` (the sample prompts), keep their outputs, and drop the
        text encoders; ``encode_prompts`` then answers from what was kept."""
        kept = {}
        for caption in dict.fromkeys(keep):
            with torch.no_grad():
                kept[caption] = {k: v.cpu() for k, v in self.encode_prompts(models, [caption]).items()}
        models.info["kept_prompts"] = kept
        models.text_encoders = []
        if models.device.type == "cuda":
            torch.cuda.empty_cache()

    def kept_prompts(self, models: Models, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        kept = models.info["kept_prompts"]
        missing = [c for c in captions if c not in kept]
        if missing:
            raise ValueError(f"the text encoders were freed after caching, and {missing[0]!r} was not encoded before")
        return {k: torch.cat([kept[c][k] for c in captions]).to(models.device) for k in kept[captions[0]]}

    def default_size(self, models: Models) -> tuple[int, int]:
        """(width, height) the model was trained at; the sample size when a prompt names none."""
        return 1024, 1024


_FAMILIES: dict[str, ModelFamily] = {}


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    _FAMILIES[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    from . import sdxl  # noqa: F401  (registers itself)
    from . import flux  # noqa: F401  (registers itself)


def family_names() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    _load_builtin()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}") from None


def detect_family(pretrained: str) -> ModelFamily:
    """The family of ``model.pretrained``: a ``builtin:`` name, a single file or a folder."""
    _load_builtin()
    if pretrained.startswith(BUILTIN_PREFIX):
        name = pretrained[len(BUILTIN_PREFIX):]
        for family in _FAMILIES.values():
            if name in family.builtin_models:
                return family
        known = sorted(BUILTIN_PREFIX + n for f in _FAMILIES.values() for n in f.builtin_models)
        raise ValueError(f"unknown built-in model {pretrained!r}; built-in: {', '.join(known)}")
    if not os.path.exists(pretrained):
        raise FileNotFoundError(f"model.pretrained: {pretrained} does not exist")
    for family in _FAMILIES.values():
        if family.recognises(pretrained):
            return family
    raise ValueError(
        f"model.pretrained: {pretrained} is not a model this trainer knows (families: {', '.join(sorted(_FAMILIES))}); "
        "expected an original-layout single-file .safetensors checkpoint or a diffusers model folder"
    )
