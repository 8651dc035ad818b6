"""The training config: one TOML file, typed sections, every mistake reported at once.

``python -m trainer --config dog.toml`` reads ``[model]``, ``[network]``, ``[training]``,
``[sampling]``, ``[saving]``, ``[logging]`` and the dataset: kohya's ``[general]`` /
``[[datasets]]`` / ``[[datasets.subsets]]`` inline, or ``dataset_config = "path.toml"``
naming an unchanged kohya dataset file. Relative paths resolve against the folder of the
file that holds them (``--set`` values count as the main config's). Option names follow
kohya where kohya has one; kohya's spellings of the others get a pointer to ours.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

from . import dataset_config as dc
from .plan import DatasetPlan
from .schema import (
    AnyTable, Bool, CliValue, ConfigError, Context, Enum, describe, Field, Float, Int, PathT, Schema, Section, Str,
    StrOrList, join, option, schema_of, suggest, unknown_key,
)
from .tomlfile import load_toml, parse_value

BUILTIN_MODELS = {"tiny-sdxl": "sdxl", "tiny-flux": "flux"}


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str = option(PathT(keep_prefixes=("builtin:",)), required=True,
                             help='"builtin:tiny-sdxl", a single-file .safetensors, or a diffusers folder',
                             kohya="pretrained_model_name_or_path")
    family: str = option(Enum("auto", "sdxl", "flux"), "auto", help="model family; auto: detected from the checkpoint")
    config_dir: str | None = option(PathT(), help="diffusers config folder used with a single file")
    tokenizer: str | None = option(PathT(), help="local tokenizer folder")
    vae: str | None = option(PathT(), help="a separate VAE file", kohya="vae")
    prediction_type: str | None = option(Enum("epsilon", "v_prediction"),
                                         help="SDXL: what the UNet predicts; default: the model's scheduler config"
                                              " (a diffusers folder's, or model.config_dir's"
                                              " scheduler/scheduler_config.json), else epsilon; kohya's"
                                              ' v_parameterization = true is "v_prediction"',
                                         kohya="v_parameterization")
    # ---- FLUX files (brief H1a): what FLUX users have beside the transformer
    ae: str | None = option(PathT(), help="FLUX: the autoencoder (ae.safetensors) when model.pretrained does not"
                            " hold it", kohya="ae")
    clip_l: str | None = option(PathT(), help="FLUX: the CLIP-L text encoder (clip_l.safetensors) when"
                                " model.pretrained does not hold it", kohya="clip_l")
    t5xxl: str | None = option(PathT(), help="FLUX: the T5-XXL text encoder (t5xxl_fp16.safetensors or"
                               " t5xxl_fp8_e4m3fn.safetensors) when model.pretrained does not hold it", kohya="t5xxl")
    t5_tokenizer: str | None = option(PathT(), help="FLUX: a local T5 tokenizer folder (tokenizer.json or"
                                      " spiece.model, e.g. a diffusers FLUX model's tokenizer_2/); default: the"
                                      " model folder's, else google/t5-v1_1-xxl from the Hugging Face cache")
    basis: str | None = option(PathT(), help="FLUX: where the QR-LoRA basis comes from when the transformer is"
                               " stored in fp8: a basis file (qrlora basis ... -o) or the 16-bit file of the"
                               " same model")
    fp8_base: bool = option(Bool(), False, help="FLUX: store the frozen transformer's linear weights as"
                            " float8_e4m3fn, computed in the mixed-precision dtype (the basis is read from the"
                            " 16-bit file before the cast)", kohya="fp8_base")
    # ---- end FLUX files


@dataclass(frozen=True)
class NetworkConfig:
    type: str = option(Enum("qrlora", "lora"), "qrlora", help="qrlora: frozen Q, trained ΔR; lora: plain LoRA")
    rank: int = option(Int(min=1), 16, help="rank r of ΔR (r × in)", kohya="network_dim")
    alpha: float | None = option(Float(min=0, min_open=True), help="scale s = alpha / rank; default = rank (scale 1)",
                                kohya="network_alpha")
    mask: str = option(Enum("triu", "none"), "triu", help="mask applied to ΔR (triu: upper-triangular, as QR-LoRA)")
    targets: str | list[str] | None = option(StrOrList(), help="a preset name or module patterns; default: the"
                                                               " family's preset")
    train_text_encoder: bool = option(Bool(), False, help="also adapt the text encoders"
                                      " (kohya's network_train_unet_only, inverted)")
    text_encoder_lr: float | None = option(Float(min=0), help="learning rate of the text encoders' adapters;"
                                           " default: training.learning_rate", kohya="text_encoder_lr")
    basis_cache: str | None = option(PathT(), help="basis cache folder; default: the standard cache dir")
    dropout: float = option(Float(min=0, max=1, max_open=True), 0.0, help="dropout on the adapter's input",
                           kohya="network_dropout")


_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


@dataclass(frozen=True)
class TrainingConfig:
    output_dir: str = option(PathT(), required=True, help="where weights, state and samples go", kohya="output_dir")
    output_name: str | None = option(Str(nonempty=True, pattern=r"[^/\\]+", expected="a file name (no slashes)"),
                                     help="file name of the saves; default: the config file's name without .toml",
                                     kohya="output_name")
    seed: int = option(Int(min=0), 42, help="seed of the data order, noise and timesteps", kohya="seed")
    max_train_steps: int = option(Int(min=1), 1600, help="optimizer steps to train (kohya's default)",
                                 kohya="max_train_steps")
    max_train_epochs: int | None = option(Int(min=1), help="overrides max_train_steps, as in kohya",
                                          kohya="max_train_epochs")
    learning_rate: float = option(Float(min=0, min_open=True), 1e-4, help="learning rate of the adapter",
                                  kohya="learning_rate")
    optimizer: str = option(Enum("adamw", "sgd", "adamw8bit", "prodigy", ignore_case=True), "adamw",
                            help="optimizer", kohya="optimizer_type")
    optimizer_args: dict = option(AnyTable(), {}, help="keyword arguments for the optimizer, passed through",
                                 kohya="optimizer_args")
    lr_scheduler: str = option(Enum(*_SCHEDULERS), "constant", help="learning-rate schedule", kohya="lr_scheduler")
    lr_warmup_steps: int | float = option(Float(min=0, keep_int=True), 0,
                                          help="steps, or a float < 1 for a fraction of the total steps",
                                          kohya="lr_warmup_steps")
    lr_scheduler_num_cycles: int = option(Int(min=1), 1, help="restarts of cosine_with_restarts",
                                         kohya="lr_scheduler_num_cycles")
    mixed_precision: str = option(Enum("no", "fp16", "bf16"), "no", help="autocast precision of the frozen model",
                                 kohya="mixed_precision")
    gradient_checkpointing: bool = option(Bool(), False, help="less memory, slower steps",
                                          kohya="gradient_checkpointing")
    gradient_accumulation_steps: int = option(Int(min=1), 1, help="batches per optimizer step",
                                             kohya="gradient_accumulation_steps")
    max_grad_norm: float = option(Float(min=0), 1.0, help="gradient clipping norm; 0 disables clipping",
                                 kohya="max_grad_norm")
    noise_offset: float = option(Float(min=0), 0.0, help="per-channel noise offset (darker/brighter images)",
                                kohya="noise_offset")
    min_snr_gamma: float | None = option(Float(min=0, min_open=True), help="Min-SNR loss weighting, e.g. 5;"
                                         " unset = off", kohya="min_snr_gamma")
    prior_loss_weight: float = option(Float(min=0), 1.0, help="loss weight of is_reg images",
                                     kohya="prior_loss_weight")
    cache_latents: bool = option(Bool(), False, help="encode each image once and keep its latent in memory",
                                 kohya="cache_latents")
    cache_latents_to_disk: bool = option(Bool(), False, help="keep the latents on disk; implies cache_latents",
                                         kohya="cache_latents_to_disk")
    cache_text_encoder_outputs: bool = option(Bool(), False, help="encode each caption once (fixed captions only)",
                                              kohya="cache_text_encoder_outputs")
    cache_text_encoder_outputs_to_disk: bool = option(Bool(), False, help="keep them on disk; implies"
                                                      " cache_text_encoder_outputs",
                                                      kohya="cache_text_encoder_outputs_to_disk")
    max_data_loader_n_workers: int = option(Int(min=0), 0, help="image-loading worker processes; 0 loads in"
                                           " the training process", kohya="max_data_loader_n_workers")
    device: str = option(Str(pattern=r"auto|cpu|mps|(cuda|xpu)(:\d+)?", expected="'auto', 'cpu', 'mps' or 'cuda[:N]'"),
                         "auto", help="where to train; auto: the accelerator when there is one")
    cpu_threads: int = option(Int(min=0), 0,
                              help="CPU threads for torch; 0 = auto: 1 thread when training on the CPU a model under"
                                   " 100 million parameters (many small operations), torch's default otherwise")

    def warmup_steps(self, total_steps: int) -> int:
        """kohya's rule: an int is a step count, a float a fraction of the total."""
        w = self.lr_warmup_steps
        return int(w * total_steps) if isinstance(w, float) else w


@dataclass(frozen=True)
class SamplingConfig:
    prompts: str | list[str] | None = option(StrOrList(), help="a kohya prompt file, or a list of kohya prompt lines",
                                             kohya="sample_prompts")
    sample_every_n_steps: int | None = option(Int(min=1), help="sample every N steps", kohya="sample_every_n_steps")
    sample_every_n_epochs: int | None = option(Int(min=1), help="sample every N epochs",
                                               kohya="sample_every_n_epochs")
    sample_at_first: bool = option(Bool(), False, help="sample before the first step", kohya="sample_at_first")
    sample_sampler: str = option(Enum("euler_a", "euler", "ddim"), "euler_a", help="sampler of the samples",
                                kohya="sample_sampler")
    steps: int = option(Int(min=1), 20, help="sampling steps of a prompt without --s")
    guidance_scale: float = option(Float(min=0), 7.0, help="CFG scale of a prompt without --l")
    width: int | None = option(Int(min=8), help="sample width of a prompt without --w; default: the first"
                                                  " dataset's resolution")
    height: int | None = option(Int(min=8), help="sample height of a prompt without --h; default: the first"
                                                   " dataset's resolution")
    # ---- LAB-DEMO: scoring the samples at the end of the run (trainer/sample_scoring.py)
    scorer: str | None = option(Str(nonempty=True),
                                help='score the samples before training and at the last step, write a before/after'
                                     ' grid and print one JSON line: "lab:CONCEPT" counts the samples showing a'
                                     " concept the lab base never saw (a pattern: striped, checkered, dotted; a shape:"
                                     " diamond, ring, heart, star; every prompt a lab caption with it); needs"
                                     " sample_at_first; kohya has no equivalent")
    # ---- end LAB-DEMO


@dataclass(frozen=True)
class MetadataConfig:
    """Free-form strings written into the saved files' ``modelspec.*`` metadata."""

    title: str | None = option(Str(), help="modelspec.title; default: output_name", kohya="metadata_title")
    author: str | None = option(Str(), help="modelspec.author", kohya="metadata_author")
    description: str | None = option(Str(), help="modelspec.description", kohya="metadata_description")
    license: str | None = option(Str(), help="modelspec.license", kohya="metadata_license")
    tags: str | None = option(StrOrList(), help="modelspec.tags: comma-separated, or a list", kohya="metadata_tags")
    trigger_phrase: str | None = option(Str(), help="modelspec.trigger_phrase", kohya="metadata_trigger_phrase")


@dataclass(frozen=True)
class SavingConfig:
    save_every_n_steps: int | None = option(Int(min=1), help="periodic save every N steps", kohya="save_every_n_steps")
    save_every_n_epochs: int | None = option(Int(min=1), help="periodic save every N epochs",
                                             kohya="save_every_n_epochs")
    save_last_n: int | None = option(Int(min=1), help="keep only the last N periodic saves; default: keep all"
                                    " (kohya: save_last_n_steps / save_last_n_epochs)")
    save_precision: str = option(Enum("fp16", "bf16", "fp32"), "fp16", help="dtype of the saved ΔR",
                                kohya="save_precision")
    save_state: bool = option(Bool(), True, help="write resumable state with each save", kohya="save_state")
    resume: str | None = option(PathT(), help="a state folder to resume from", kohya="resume")
    embed_basis: bool = option(Bool(), False, help="store Q in the file (portable, larger)")
    save_naming: str = option(Enum("qrlora", "kohya"), "qrlora",
                              help="periodic save names: qrlora = NAME-step000100 / NAME-epoch000002;"
                                   " kohya = NAME-step00000100 / NAME-000002 (sd-scripts' names)")
    metadata: MetadataConfig = option(Section(MetadataConfig), MetadataConfig(),
                                      help="the [saving.metadata] table below")


@dataclass(frozen=True)
class LoggingConfig:
    logging_dir: str | None = option(PathT(), help="TensorBoard log folder", kohya="logging_dir")
    log_with: str | None = option(Enum("tensorboard", "none"), help="default: tensorboard if logging_dir is set",
                                  kohya="log_with")
    log_prefix: str | None = option(Str(), help="prefix of the TensorBoard run name", kohya="log_prefix")


# ---- [flux]: the FLUX objective (brief H1b); kohya's flux_train_network.py names and defaults
@dataclass(frozen=True)
class FluxConfig:
    """Read only when the model is FLUX.1 (rectified flow); ignored for SDXL."""

    timestep_sampling: str = option(Enum("sigma", "uniform", "sigmoid", "shift", "flux_shift"), "sigma",
                                    help="how noise levels are drawn: sigma = the discrete schedule shifted by"
                                         " discrete_flow_shift; uniform; sigmoid of a normal; shift = sigmoid then"
                                         " discrete_flow_shift; flux_shift = sigmoid then FLUX.1-dev's"
                                         " resolution-dependent shift", kohya="timestep_sampling")
    sigmoid_scale: float = option(Float(min=0, min_open=True), 1.0, help="scale of the normal draw of sigmoid,"
                                  " shift and flux_shift", kohya="sigmoid_scale")
    discrete_flow_shift: float = option(Float(min=0, min_open=True), 3.0, help="shift of timestep_sampling ="
                                        " sigma or shift", kohya="discrete_flow_shift")
    model_prediction_type: str = option(Enum("raw", "additive", "sigma_scaled"), "raw",
                                        help="what the output is compared with the velocity target as: raw,"
                                             " additive (+ noisy input), sigma_scaled (noisy input - sigma x output)."
                                             " Default raw, as kohya's guide recommends (kohya's default is"
                                             " sigma_scaled)", kohya="model_prediction_type")
    guidance_scale: float | None = option(Float(min=0), help="the guidance value fed to FLUX.1-dev's guidance"
                                          " embedding while training; default 3.5 (kohya's); schnell has no"
                                          " guidance embedding and ignores it", kohya="guidance_scale")
    t5xxl_max_token_length: int | None = option(Int(min=1), help="T5 tokens per caption; default 512 for dev,"
                                                " 256 for schnell", kohya="t5xxl_max_token_length")
    apply_t5_attn_mask: bool = option(Bool(), False, help="mask T5's padding in T5 itself and in the"
                                      " transformer's attention", kohya="apply_t5_attn_mask")
    offload_text_encoders: bool = option(Bool(), False, help="keep CLIP-L and T5 in CPU memory and run them there;"
                                         " the transformer and VAE alone use the GPU (with"
                                         " training.cache_text_encoder_outputs they run once, before training)")
    sample_guidance_scale: float = option(Float(min=0), 3.5, help="guidance embedding value of the samples of a"
                                          " prompt without --g (dev); the CFG scale (--l) stays off at 1.0 unless"
                                          " a prompt sets it")
# ---- end [flux]


SECTIONS = {"model": ModelConfig, "network": NetworkConfig, "training": TrainingConfig,
            "sampling": SamplingConfig, "saving": SavingConfig, "logging": LoggingConfig,
            "flux": FluxConfig}
# Top-level keys that say where the dataset is: kohya's own argument names.
SOURCES = Schema([
    Field("dataset_config", PathT(), help="a kohya dataset TOML/JSON file, used unchanged (its relative paths are"
          " relative to it)", kohya="dataset_config"),
    Field("train_data_dir", PathT(), help="a folder of kohya '<repeats>_<class tokens>' sub-folders (10_sks dog);"
          " with in_json, the images' folder", kohya="train_data_dir"),
    Field("reg_data_dir", PathT(), help="regularization images, in sub-folders named like train_data_dir's",
          kohya="reg_data_dir"),
    Field("in_json", PathT(), help="a fine-tuning metadata file (JSON/JSONL) for the images in train_data_dir",
          kohya="in_json"),
])
DATASET_KEYS = ("dataset_config",) + dc.FOLDER_KEYS + dc.TOP_LEVEL
TOP_LEVEL = tuple(SECTIONS) + DATASET_KEYS

# kohya argument names that we spell differently → where the option lives here: the fields
# that declare a different kohya name, and the kohya options that have no one field here.
KOHYA_NAMES = {
    f.kohya: f"{prefix}.{f.name}"
    for prefix, schema in [(n, schema_of(c)) for n, c in SECTIONS.items()] + [("saving.metadata",
                                                                              schema_of(MetadataConfig))]
    for f in schema.fields.values() if f.kohya and f.kohya != f.name
}
KOHYA_NAMES.update({
    "network_module": "network.type", "network_train_unet_only": "network.train_text_encoder (inverted)",
    "unet_lr": "training.learning_rate", "train_batch_size": "batch_size in [general] or [[datasets]]",
    "save_last_n_epochs": "saving.save_last_n", "save_last_n_steps": "saving.save_last_n",
    "save_state_on_train_end": "saving.save_state", "sample_steps": "sampling.steps",
    "dataset_repeats": "num_repeats in a [[datasets.subsets]] entry",
})


def _hints(section: str | None) -> dict[str, str]:
    """Messages for keys that exist elsewhere: another section's field, or a kohya name."""
    hints = {k: f"is kohya's name; here it is {v}" for k, v in KOHYA_NAMES.items()}
    for f in dc.DATASET_FIELDS + dc.DREAMBOOTH_FIELDS + dc.SUBSET_FIELDS:
        hints[f.name] = "is a dataset option: set it in [general] or a [[datasets]] entry"
    for f in dc.DREAMBOOTH_SUBSET_ONLY + dc.FINETUNING_SUBSET_ONLY:
        hints[f.name] = "is a dataset option: set it in a [[datasets.subsets]] entry"
    for other, cls in SECTIONS.items():
        if other != section:
            for f in dataclasses.fields(cls):
                hints[f.name] = f"belongs in [{other}]"
    for key in ("dataset_config",) + dc.FOLDER_KEYS:
        hints[key] = "is a top-level key: write it before the first [section] of the config"
    if section is not None:
        for f in dataclasses.fields(SECTIONS[section]):
            hints.pop(f.name, None)
    return hints


_SECTION_TYPES = {name: Section(cls, _hints(name)) for name, cls in SECTIONS.items()}
_TOP_HINTS = _hints(None)


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    network: NetworkConfig
    training: TrainingConfig
    sampling: SamplingConfig
    saving: SavingConfig
    logging: LoggingConfig
    flux: FluxConfig
    dataset: dc.DatasetConfig
    source: str  # the config file
    warnings: tuple[str, ...] = ()  # config-level; dataset warnings end up in DatasetPlan.warnings

    def dataset_plan(self) -> DatasetPlan:
        """Read the dataset from disk (images, captions, metadata files)."""
        return dc.build_plan(self.dataset, self.training.prior_loss_weight)

    def to_dict(self) -> dict:
        """The resolved config, JSON-ready (for --dry-run and for metadata)."""
        out: dict[str, Any] = {"config_file": self.source}
        for name in SECTIONS:
            out[name] = _plain(dataclasses.asdict(getattr(self, name)))
        out["dataset"] = _plain(self.dataset.to_dict())
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def reference() -> str:
    """Markdown reference of every option, generated from the same declarations
    (``python -m trainer --help-config``)."""
    parts = ["# Training config reference\n\nOne TOML file; relative paths are relative to the file that holds"
             " them. The kohya name is the option's name in kohya's sd-scripts (a command-line argument, or a"
             " dataset-config key).",
             describe(SOURCES, "top level: where the dataset is (or inline [general] / [[datasets]] tables, below)")]
    parts += [describe(t.schema, f"[{name}]") for name, t in _SECTION_TYPES.items()]
    parts.append(describe(schema_of(MetadataConfig), "[saving.metadata]"))
    parts.append(describe(dc.GENERAL, "[general] (kohya; also allowed in [[datasets]])"))
    parts.append(describe(dc.SUBSET[dc.DREAMBOOTH], "[[datasets.subsets]], DreamBooth (kohya)"))
    parts.append(describe(dc.SUBSET[dc.FINETUNING], "[[datasets.subsets]], fine-tuning (kohya)"))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ overrides


def apply_override(data: dict, spec: str) -> str | None:
    """Apply one ``--set section.key=value`` to the raw tables; returns a problem or None.
    A numeric segment indexes an array of tables (``datasets.0.subsets.1.num_repeats=5``)."""
    if "=" not in spec:
        return f"--set {spec!r}: expected section.key=value"
    key, text = (s.strip() for s in spec.split("=", 1))
    parts = key.split(".")
    if not all(parts):
        return f"--set {spec!r}: bad key {key!r}"
    parsed = parse_value(text)
    # Scalars keep their raw text so a string field given "2024" still gets a string.
    value = parsed if isinstance(parsed, (dict, list)) else CliValue(parsed, text)
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"--set {key}: {here} has {len(node)} entries, so {part!r} is not a valid index"
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    if part in node:
                        return f"--set {key}: {join(here if depth else '', part)} is not a table"
                    node[part] = {}
                node = node[part]
        else:
            return f"--set {key}: {here} is not a table"
    return None


# ------------------------------------------------------------------------------ loading


def load_config(path: str, overrides: Sequence[str] = (), check_paths: bool = True) -> Config:
    """Read, override, validate and resolve a config file; raise one ConfigError listing
    every problem. ``check_paths`` also checks that the named files and folders exist."""
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    raw = load_toml(path)
    ctx = Context([], base_dir=base)

    # --set general.* / datasets.* edit the dataset tables wherever they live.
    ds_overrides = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] in dc.TOP_LEVEL]
    for o in overrides:
        if o not in ds_overrides:
            _note(ctx, apply_override(raw, o))

    for key in raw:
        if key not in TOP_LEVEL:
            ctx.errors.append(unknown_key(key, "", TOP_LEVEL, _TOP_HINTS))
    sections = {name: _SECTION_TYPES[name].check(raw.get(name, {}), name, ctx) or cls()
                for name, cls in SECTIONS.items()}
    dataset = _load_dataset(raw, ds_overrides, ctx)
    warnings: list[str] = []
    sections = _finish(sections, dataset, path, ctx, warnings, check_paths)
    if ctx.errors:
        raise ConfigError(ctx.errors, path)
    return Config(**sections, dataset=dataset, source=path, warnings=tuple(warnings))


def _note(ctx: Context, problem: str | None) -> None:
    if problem:
        ctx.errors.append(problem)


def _load_dataset(raw: dict, overrides: list[str], ctx: Context) -> dc.DatasetConfig:
    inline = {k: raw[k] for k in dc.TOP_LEVEL if k in raw}
    folder_keys = [k for k in dc.FOLDER_KEYS if k in raw]
    if folder_keys:
        return _load_folders(raw, folder_keys, inline, overrides, ctx)
    if "dataset_config" in raw and inline:
        ctx.errors.append("dataset_config and inline [general]/[[datasets]] tables are both given; use one")
        return dc.DatasetConfig(())
    if "dataset_config" not in raw and not inline and not overrides:
        ctx.errors.append("no dataset: add [[datasets]] with [[datasets.subsets]] tables,"
                          " dataset_config = \"path/to/kohya_dataset.toml\", or kohya's train_data_dir ="
                          " \"folder of '10_sks dog' sub-folders\"")
        return dc.DatasetConfig(())
    if "dataset_config" not in raw:  # inline: paths resolve against the main config
        for o in overrides:
            _note(ctx, apply_override(inline, o))
        return dc.resolve(inline, ctx)
    file = PathT().check(raw["dataset_config"], "dataset_config", ctx)
    if file is None:
        return dc.DatasetConfig(())
    try:
        ds_raw = dc.read_dataset_file(file)
    except ConfigError as e:
        ctx.errors += [f"dataset_config: {p}" if e.source is None else f"{e.source}: {p}" for p in e.problems]
        return dc.DatasetConfig((), file)
    for o in overrides:
        _note(ctx, apply_override(ds_raw, o))
    sub = Context([], base_dir=os.path.dirname(file))  # its relative paths resolve against its folder
    cfg = dc.resolve(ds_raw, sub)
    ctx.errors += [f"{file}: {p}" for p in sub.errors]
    return dc.DatasetConfig(cfg.datasets, file, cfg.warnings)


def _load_folders(raw: dict, keys: list[str], inline: dict, overrides: list[str], ctx: Context) -> dc.DatasetConfig:
    """kohya's train_data_dir / reg_data_dir / in_json: subsets generated from the folders,
    with the dataset options of [general] (where kohya takes them from its arguments)."""
    given = " / ".join(keys)
    if "dataset_config" in raw:  # kohya uses the dataset config and ignores the folders, with a warning
        ctx.errors.append(f"{given} and dataset_config are both given; use one (kohya would ignore {given})")
        return dc.DatasetConfig(())
    if "datasets" in inline:
        ctx.errors.append(f"{given} and [[datasets]] tables are both given; use one ({given} makes the one"
                          " [[datasets]] entry; set its options in [general])")
        return dc.DatasetConfig(())
    errors = len(ctx.errors)
    folders = {k: v for k, v in SOURCES.validate({k: raw[k] for k in keys}, "", ctx, fill_defaults=False).items()
               if v is not None}
    if len(ctx.errors) > errors:
        return dc.DatasetConfig(())
    tables, names, notes = dc.folder_tables(folders, ctx)
    if len(ctx.errors) > errors:
        return dc.DatasetConfig(())
    if "general" in inline:
        tables["general"] = inline["general"]
    for o in overrides:
        _note(ctx, apply_override(tables, o))
    cfg = dc.resolve(tables, ctx, names)
    return dc.DatasetConfig(cfg.datasets, None, tuple(notes) + cfg.warnings)


def _finish(s: dict, dataset: dc.DatasetConfig, path: str, ctx: Context, warnings: list[str],
            check_paths: bool) -> dict:
    """Fill derived defaults and check what one field alone cannot."""
    m, n, t, smp, sv, lg = (s[k] for k in ("model", "network", "training", "sampling", "saving", "logging"))
    err = ctx.errors.append
    rep = dataclasses.replace

    # [model]
    if m.pretrained is None:
        pass  # reported as required
    elif m.pretrained.startswith("builtin:"):
        name = m.pretrained[len("builtin:"):]
        if name not in BUILTIN_MODELS:
            err(f"model.pretrained: unknown built-in model {name!r}; built-ins: "
                + ", ".join(f"'builtin:{b}'" for b in BUILTIN_MODELS) + suggest(name, BUILTIN_MODELS))
        elif m.family not in ("auto", BUILTIN_MODELS[name]):
            err(f"model.family: {m.family!r} does not match {m.pretrained!r} ({BUILTIN_MODELS[name]})")
        else:
            m = rep(m, family=BUILTIN_MODELS[name])
    elif check_paths and m.pretrained:
        if os.path.isfile(m.pretrained) and not m.pretrained.endswith(".safetensors"):
            err(f"model.pretrained: {m.pretrained} is not a .safetensors file (.ckpt is not supported)")
        _exists(ctx, "model.pretrained", m.pretrained)
    if check_paths:
        for key in ("config_dir", "tokenizer", "vae", "ae", "clip_l", "t5xxl", "t5_tokenizer", "basis"):  # FLUX files: H1a
            _exists(ctx, f"model.{key}", getattr(m, key))

    # [network]
    if n.alpha is None:
        n = rep(n, alpha=float(n.rank))
    if n.text_encoder_lr is not None and not n.train_text_encoder:
        warnings.append("network.text_encoder_lr has no effect: network.train_text_encoder is false")

    # [training]
    if t.output_name is None:
        t = rep(t, output_name=os.path.splitext(os.path.basename(path))[0])
    if isinstance(t.lr_warmup_steps, float) and t.lr_warmup_steps >= 1:
        err(f"training.lr_warmup_steps: a float is a fraction of the total steps and must be < 1, got"
            f" {t.lr_warmup_steps}; write an integer for a step count")
    if t.lr_scheduler == "constant" and t.lr_warmup_steps:
        err("training.lr_warmup_steps: lr_scheduler = 'constant' takes no warmup (kohya refuses it too); use"
            " 'constant_with_warmup' or remove lr_warmup_steps")
    t = rep(t, cache_latents=t.cache_latents or t.cache_latents_to_disk,
            cache_text_encoder_outputs=t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk)
    if t.optimizer == "prodigy" and t.learning_rate <= 0.1:
        warnings.append(f"training.learning_rate is {t.learning_rate}; Prodigy adapts the step size and expects"
                        " learning_rate around 1.0")
    subsets = [sub for d in dataset.datasets for sub in d.subsets]
    if t.cache_text_encoder_outputs:
        if n.train_text_encoder:
            err("training.cache_text_encoder_outputs cannot be used with network.train_text_encoder = true")
        changing = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                    "caption_tag_dropout_rate")
        for sub in subsets:
            bad = [k for k in changing if sub.options.get(k)]
            if bad:
                err(f"training.cache_text_encoder_outputs: {sub.source} sets {', '.join(bad)}, which change the"
                    " caption every epoch, so its text encoder outputs cannot be cached")
    if t.cache_latents:
        for sub in subsets:
            if sub.options.get("random_crop"):
                err(f"training.cache_latents: {sub.source} sets random_crop, which changes the latents every"
                    " epoch, so they cannot be cached")

    # [sampling]
    if isinstance(smp.prompts, str):
        smp = rep(smp, prompts=PathT().check(smp.prompts, "sampling.prompts", ctx))
        if check_paths and smp.prompts:
            _exists(ctx, "sampling.prompts", smp.prompts, want_file=True)
    if (smp.sample_every_n_steps or smp.sample_every_n_epochs or smp.sample_at_first) and not smp.prompts:
        err("sampling.prompts is required when sampling is on (sample_every_n_steps / sample_every_n_epochs /"
            " sample_at_first)")
    if smp.scorer is not None:  # LAB-DEMO: sampling.scorer
        from .sample_scoring import scorer_problems

        ctx.errors.extend(scorer_problems(smp, check_paths))
    if dataset.datasets and dataset.datasets[0].options["resolution"] is not None:
        w, h = dataset.datasets[0].options["resolution"]
        smp = rep(smp, width=smp.width or w, height=smp.height or h)

    # [saving]
    if sv.save_last_n is not None and not (sv.save_every_n_steps or sv.save_every_n_epochs):
        warnings.append("saving.save_last_n has no effect without save_every_n_steps or save_every_n_epochs")
    if isinstance(sv.metadata.tags, list):
        sv = rep(sv, metadata=rep(sv.metadata, tags=", ".join(sv.metadata.tags)))
    if check_paths and sv.resume:
        _exists(ctx, "saving.resume", sv.resume)

    # [logging]
    if lg.log_with is None:
        lg = rep(lg, log_with="tensorboard" if lg.logging_dir else "none")
    elif lg.log_with == "tensorboard" and not lg.logging_dir:
        err("logging.log_with = 'tensorboard' needs logging.logging_dir")
    return {"model": m, "network": n, "training": t, "sampling": smp, "saving": sv, "logging": lg, "flux": s["flux"]}


def _exists(ctx: Context, key: str, path: str | None, want_file: bool = False) -> None:
    if path and not os.path.exists(path):
        ctx.errors.append(f"{key}: {path} does not exist")
    elif path and want_file and not os.path.isfile(path):
        ctx.errors.append(f"{key}: {path} is not a file")
