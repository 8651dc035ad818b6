"""Everything a run needs before its first step: model, targets, basis, adapters, data, optimizer.

Kept apart from the loop so that ``--dry-run``, the loop and the tests build the same things
the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch

from qrlora import archs
from qrlora.archs import Target
from qrlora.basis import Basis, BasisCache, compute_basis
from qrlora.cli import ProgressBar, default_cache_dir
from trainer.cache import LatentCache, TextCache
from trainer.config import Config
from trainer.schema import ConfigError
from trainer.data import TrainData
from trainer.families import BUILTIN_PREFIX, ModelFamily, Models, detect_family, get_family
from trainer.network import AdapterNetwork
from trainer.optim import make_optimizer, make_scheduler

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Schedule:
    batches_per_epoch: int  # all processes together
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    epochs: int


def family_for(cfg: Config) -> ModelFamily:
    if cfg.model.family != "auto":
        return get_family(cfg.model.family)
    return detect_family(cfg.model.pretrained)


def target_spec(cfg: Config, arch: archs.Architecture):
    return cfg.network.targets or arch.default_preset


def select_targets(cfg: Config, family: ModelFamily, all_targets: list[Target], te_names: set[str]) -> list[Target]:
    """The configured targets; with ``train_text_encoder`` also every text-encoder layer."""
    chosen = archs.get(family.name).select(all_targets, target_spec(cfg, archs.get(family.name)))
    if cfg.network.train_text_encoder:
        have = {t.name for t in chosen}
        chosen += [t for t in all_targets if t.name in te_names and t.name not in have]
    return chosen


def load_models(cfg: Config, device: torch.device) -> tuple[ModelFamily, Models]:
    family = family_for(cfg)
    models = family.load(cfg.model, device, WEIGHT_DTYPES[cfg.training.mixed_precision], run=cfg)
    for module in [models.denoiser, models.vae, *models.text_encoders]:
        module.requires_grad_(False)
    models.vae.eval()
    for te in models.text_encoders:
        te.eval()
    models.denoiser.train()  # diffusers' gradient checkpointing only runs in training mode
    if cfg.training.gradient_checkpointing and hasattr(models.denoiser, "enable_gradient_checkpointing"):
        models.denoiser.enable_gradient_checkpointing()
    models.warnings = family.configure(models, cfg)  # the family's own options (FLUX's [flux] objective)
    return family, models


def layer_modules(cfg: Config, family: ModelFamily, models: Models):
    """(targets, {name: nn.Linear}) of this run."""
    all_modules = family.trainable_modules(models, include_text_encoders=True)
    unet_only = family.trainable_modules(models, include_text_encoders=False)
    te_names = set(all_modules) - set(unet_only)
    targets = select_targets(cfg, family, family.targets(models), te_names)
    return targets, {t.name: all_modules[t.name] for t in targets}


def make_basis(cfg: Config, family: ModelFamily, models: Models, targets: list[Target], device, quiet=False) -> Basis:
    """The canonical basis of these targets: from ``model.basis`` when it names a basis file
    (checked against this run's layers and the loaded weights), else from the cache (checked
    against the sketch recorded when it was computed), else computed from the file the weights
    came from (or the loaded base weights when there is no single file). Every basis records
    a projection of the weights it came from, so a quantized copy of the model can find it.
    A resumed run checks it against the sketch of the ΔR file saved with its state, so it
    never continues on another basis."""
    cache = BasisCache(cfg.network.basis_cache or default_cache_dir())
    names = [t.name for t in targets]
    progress = None if quiet else ProgressBar("basis")
    basis_file = models.info.get("basis_file")
    if basis_file:
        basis = basis_from_file(basis_file, cfg, models, targets)
    elif models.basis_source:
        basis, _ = cache.get_or_compute(models.basis_source, cfg.network.rank, names, family.name,
                                        device=device, progress=progress, log=None if quiet else print)
    else:
        sketches: dict[str, torch.Tensor] = {}
        q, bid = compute_basis(lambda t: family.base_weight(models, t.name), targets, family.name, cfg.network.rank,
                               device=device, progress=progress, weight_sketches=sketches)
        basis = Basis(family.name, cfg.network.rank, list(targets), q, bid, names,
                      {"base_model": os.path.basename(os.path.normpath(cfg.model.pretrained))},
                      weight_sketch=torch.stack([sketches[n] for n in names]))
        cache.store(basis)
    if getattr(cfg.model, "basis", None):  # the basis comes from other files than the loaded weights
        said = check_model_identity(cfg, family, models, basis)
        if not quiet:
            print(said)
    if cfg.saving.resume:
        check_resumed_basis(cfg.saving.resume, basis)
    return basis


def _basis_command(cfg: Config, models: Models) -> str:
    """The command that makes this run's basis (the family's, naming its 16-bit release)."""
    from qrlora.basis import basis_command

    return models.info.get("basis_command") or basis_command(
        f"<the 16-bit file of {os.path.basename(os.path.normpath(cfg.model.pretrained))}>", cfg.network.rank,
        cfg.network.targets or "", "basis.safetensors")


def basis_from_file(path: str, cfg: Config, models: Models, targets: list[Target]) -> Basis:
    """``model.basis`` as a basis file (made once by ``qrlora basis`` from the 16-bit weights): it
    must cover exactly this run's layers, and its Q must be the one recorded when it was made."""
    from qrlora.basis import check_basis, load_basis
    from qrlora.checkpoint import FileFormatError

    basis = load_basis(path)
    have = {t.name: t.shape for t in basis.targets}
    wrong = [t.name for t in targets if have.get(t.name) != t.shape]
    if wrong or len(have) != len(targets):
        what = f"lacks {len(wrong)} of this run's {len(targets)} layers (first: {wrong[0]})" if wrong else \
            f"covers {len(have)} layers and this run trains {len(targets)}"
        raise ConfigError([f"model.basis: {path} {what}; make the basis of network.targets with "
                           f"`{_basis_command(cfg, models)}`"])
    if basis.stored_sketch is not None:
        check = check_basis(basis.names, basis.stored_sketch, basis.basis_id, basis.q, basis.basis_id)
        if not check.ok:
            raise FileFormatError(f"model.basis: {path} is not the basis that was computed ({check.describe()}); "
                                  f"make it again with `{_basis_command(cfg, models)}`")
    by_name = {t.name: i for i, t in enumerate(basis.targets)}
    order = [by_name[t.name] for t in targets]  # the run's layer order
    return Basis(basis.arch, basis.rank, list(targets), basis.q, basis.basis_id, basis.target_spec, basis.source,
                 None if basis.stored_sketch is None else basis.stored_sketch[order],
                 None if basis.weight_sketch is None else basis.weight_sketch[order])


def check_model_identity(cfg: Config, family: ModelFamily, models: Models, basis: Basis) -> str:
    """Raise a UserError unless ``basis`` (from ``model.basis``) was made from the loaded model:
    its record of the weights it came from must match the loaded weights within the rounding of
    the storage they were read from (``qrlora.basis.IDENTITY_LIMITS``). Returns the line saying so."""
    from qrlora.basis import identity_difference, identity_limit, weight_sketch
    from qrlora.errors import IncompatibleFiles

    given, pretrained = cfg.model.basis, cfg.model.pretrained
    if basis.weight_sketch is None:
        raise ConfigError([f"model.basis: {given} records no projection of the weights it was made from (an older "
                           f"qrlora made it), so it cannot be checked against {pretrained}; make it again with "
                           f"`{_basis_command(cfg, models)}`"])
    modules = family.trainable_modules(models, include_text_encoders=True)
    measured = [weight_sketch(modules[name].weight) for name in basis.names]
    storages = models.info.get("weight_storage") or sorted(
        {str(modules[n].weight.dtype).removeprefix("torch.") for n in basis.names})
    difference, limit = identity_difference(list(basis.weight_sketch), measured), identity_limit(storages)
    rounding = f"{'/'.join(storages)} rounding allows {limit:.0%}"
    if difference > limit:
        raise IncompatibleFiles(f"model.basis: {given} was made from another model than model.pretrained {pretrained}: "
                                f"the loaded weights differ from its record by {difference:.1%} ({rounding}); make the "
                                f"basis from the 16-bit file of this model with `{_basis_command(cfg, models)}`")
    return f"basis {basis.basis_id} from {given}: the loaded weights match its record ({difference:.2%}; {rounding})"


def check_resumed_basis(state_folder: str, basis: Basis) -> None:
    """Raise a UserError when ``basis`` is not the one the ΔR file saved beside the state
    (``NAME-state`` → ``NAME.safetensors``) was trained on, ids and sketch both measured."""
    from qrlora import deltar
    from qrlora.basis import check_basis
    from qrlora.errors import UserError

    folder = os.path.normpath(state_folder)
    adapter = folder[: -len("-state")] + ".safetensors" if folder.endswith("-state") else ""
    if not adapter or not os.path.isfile(adapter):
        return  # nothing saved beside the state to compare with (the state itself holds no basis)
    d = deltar.load(adapter)
    if d.rank != basis.rank or any(n not in basis.q for n in d.names):
        return  # another rank or layer set: the resume's own network check names both sides
    check = check_basis(d.names, d.sketch, d.basis_id, basis.q, basis.basis_id)
    if not check.ok:
        raise UserError(f"saving.resume: {state_folder} was trained on another basis than this run's: "
                        f"{check.describe()}; resume with the base model and network settings of that run")


def make_network(cfg: Config, modules, basis: Basis | None) -> AdapterNetwork:
    n = cfg.network
    alpha = n.alpha if n.alpha is not None else float(n.rank)
    if n.type == "qrlora":
        return AdapterNetwork.qrlora(modules, basis.q, alpha, n.mask, n.dropout)
    return AdapterNetwork.lora(modules, n.rank, alpha, n.dropout)


def make_data(cfg: Config, plan, models: Models | None) -> TrainData:
    t = cfg.training
    latent_cache = text_cache = None
    cache_dir = os.path.join(t.output_dir, "cache")
    if models is not None and (t.cache_latents or t.cache_latents_to_disk):
        latent_cache = LatentCache(cache_dir if t.cache_latents_to_disk else None, models.identity)
    if models is not None and (t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk):
        text_cache = TextCache(cache_dir if t.cache_text_encoder_outputs_to_disk else None,
                               f"{models.identity}/{models.tokenizer_source}")
    return TrainData(plan, t.seed, latent_cache, text_cache)


def schedule(cfg: Config, data: TrainData, num_processes: int = 1) -> Schedule:
    t = cfg.training
    per_epoch = data.steps_per_epoch(num_processes, t.gradient_accumulation_steps)
    total = t.max_train_epochs * per_epoch if t.max_train_epochs else t.max_train_steps
    return Schedule(len(data), per_epoch, total, math.ceil(total / per_epoch))


def make_optimization(cfg: Config, network: AdapterNetwork, te_names: set[str], total_steps: int):
    t = cfg.training
    denoiser = [p for n, a in network.items() if n not in te_names for p in a.parameters() if p.requires_grad]
    text = [p for n, a in network.items() if n in te_names for p in a.parameters() if p.requires_grad]
    groups = [{"params": denoiser, "lr": t.learning_rate}]
    if text:
        groups.append({"params": text, "lr": cfg.network.text_encoder_lr or t.learning_rate})
    optimizer = make_optimizer(t.optimizer, groups, t.learning_rate, t.optimizer_args)
    scheduler = make_scheduler(t.lr_scheduler, optimizer, total_steps, t.warmup_steps(total_steps),
                               t.lr_scheduler_num_cycles)
    return optimizer, scheduler


def header_targets(cfg: Config) -> list[Target] | None:
    """Target layers from a checkpoint's header alone (for --dry-run; no weights loaded)."""
    from qrlora.checkpoint import SafetensorsFile

    family = family_for(cfg)
    path = cfg.model.pretrained
    if path.startswith(BUILTIN_PREFIX):
        tiny = getattr(family, "tiny_model", None)
        if tiny is None:
            return None
        path = tiny()[0]
    if not os.path.isfile(path):
        return None
    arch = archs.get(family.name)
    all_targets = arch.linear_targets(SafetensorsFile(path).shapes())
    return select_targets(cfg, family, all_targets, text_encoder_names(arch, all_targets))


def text_encoder_names(arch: archs.Architecture, targets: list[Target]) -> set[str]:
    """Layers that live in a text encoder (their diffusers component is ``text_encoder*``)."""
    return {t.name for t in targets if arch.diffusers_components.get(t.name.split(".", 1)[0], "").startswith("text_encoder")}


# ----------------------------------------------------------------- what decides the result
def input_record(cfg: Config, models: Models) -> dict[str, str]:
    """Metadata naming the inputs that decide the trained weights besides the config: the base
    weights (by content), the tokenizer (how it was chosen and the digest of its files) and
    the libraries that compute. Printed at start (``describe_inputs``) and written into every
    saved file. Folder names only: files are shared, users' absolute paths are not."""
    import diffusers
    import transformers

    base = {"pretrained": _shareable(cfg.model.pretrained), "identity": models.identity}
    if cfg.model.vae:
        base["vae"] = _shareable(cfg.model.vae)
    tok = models.tokenizer
    tokenizer = {"kind": tok.kind, "sha256": tok.sha256}
    if tok.kind in ("model.tokenizer", "model folder"):
        tokenizer["folder"] = _shareable(tok.source)
    software = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    return {"qrlora.base_model": json.dumps(base), "qrlora.tokenizer": json.dumps(tokenizer),
            "qrlora.software": json.dumps(software)}


def _shareable(path: str) -> str:
    return path if path.startswith(BUILTIN_PREFIX) else os.path.basename(os.path.normpath(path))


def describe_inputs(cfg: Config, models: Models) -> str:
    """The start-of-run lines saying which weights and tokenizer this run uses."""
    vae = f", VAE {cfg.model.vae}" if cfg.model.vae else ""
    return (f"base model: {cfg.model.pretrained} (content {models.identity}{vae})\n"
            f"tokenizer: {models.tokenizer_source}")


def file_timestamp(now: float | None = None) -> int:
    """Seconds since the epoch for timestamps written into files: ``$SOURCE_DATE_EPOCH`` when
    set (the reproducible-builds convention), so that the same inputs give the same bytes."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if fixed:
        try:
            return int(fixed)
        except ValueError:
            raise ConfigError([f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {fixed!r}"]) from None
    return int(now if now is not None else datetime.datetime.now().timestamp())


def file_date(timestamp: int) -> str:
    """``modelspec.date`` (UTC, ISO 8601) of a ``file_timestamp``."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def session_id(cfg: Config, inputs: dict[str, str], started_at: int) -> str:
    """kohya's ``ss_session_id`` (ties a run's periodic and final files together): derived from
    the config, the inputs and the start time instead of drawn at random, so a reproducible
    run writes the same id."""
    text = json.dumps([cfg.to_dict(), inputs, started_at], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
