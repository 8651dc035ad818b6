"""kohya's dataset TOML (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``) → DatasetPlan.

Same field names, levels, defaults and inheritance as kohya's ``library/config_util.py``
(a subset option is looked up in the subset, then its dataset, then ``[general]``, then the
default), same kind detection (a subset with ``metadata_file`` is fine-tuning, one without
is DreamBooth; one dataset cannot mix them), and the same reading rules
(``trainer.dataset_scan``). Two steps: :func:`resolve` checks the tables without touching
the disk (so ``load_config`` reports dataset mistakes with the rest), :func:`build_plan`
reads folders, captions and metadata files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from .dataset_scan import scan_dreambooth, scan_finetuning
from .plan import (AugmentOptions, BucketOptions, CaptionOptions, DatasetPlan, DatasetSpec, ImageItem, SubsetInfo,
                   balanced_repeats)
from .schema import (
    AnyTable, Bool, ConfigError, Context, Enum, Field, Float, Int, Pair, PathT, Schema, Str, join, show, suggest,
)
from .tomlfile import load_toml

DREAMBOOTH, FINETUNING = "dreambooth", "finetuning"
_INTERP = Enum("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

# Defaults are kohya's *effective* ones: its argparse defaults, which win over its dataclass
# defaults because argparse values are always present in the lookup chain.
DATASET_FIELDS = [
    Field("resolution", Pair(Int(min=1), scalar_ok=True, names=("width", "height")), None, help="required somewhere"),
    Field("batch_size", Int(min=1), 1),
    Field("enable_bucket", Bool(), False),
    Field("min_bucket_reso", Int(min=1), 256),
    Field("max_bucket_reso", Int(min=1), 1024),
    Field("bucket_reso_steps", Int(min=1), 64),
    Field("bucket_no_upscale", Bool(), False),
    Field("network_multiplier", Float(), 1.0),
    Field("validation_seed", Int(), None),
    Field("validation_split", Float(min=0, max=1), 0.0),
    Field("resize_interpolation", _INTERP, None),
]
SUBSET_FIELDS = [  # allowed at all three levels
    Field("num_repeats", Int(), 1),
    Field("shuffle_caption", Bool(), False),
    Field("caption_separator", Str(), ","),
    Field("keep_tokens", Int(min=0), 0),
    Field("keep_tokens_separator", Str(), ""),
    Field("secondary_separator", Str(), None),
    Field("enable_wildcard", Bool(), False),
    Field("caption_prefix", Str(), None),
    Field("caption_suffix", Str(), None),
    Field("color_aug", Bool(), False),
    Field("flip_aug", Bool(), False),
    Field("random_crop", Bool(), False),
    Field("face_crop_aug_range", Pair(Float(), names=("low", "high")), None),
    Field("token_warmup_min", Int(), 1),
    Field("token_warmup_step", Float(min=0, keep_int=True), 0),
    Field("custom_attributes", AnyTable(), None),
    Field("resize_interpolation", _INTERP, None),
    Field("caption_dropout_rate", Float(min=0, max=1), 0.0),
    Field("caption_dropout_every_n_epochs", Int(min=0), 0),
    Field("caption_tag_dropout_rate", Float(min=0, max=1), 0.0),
]
DREAMBOOTH_FIELDS = [  # DreamBooth only, but may be inherited from the dataset or [general]
    Field("caption_extension", Str(), ".caption"),
    Field("class_tokens", Str(), None),
    Field("cache_info", Bool(), False),
]
DREAMBOOTH_SUBSET_ONLY = [
    Field("image_dir", PathT(), required=True),
    Field("is_reg", Bool(), False),
    Field("alpha_mask", Bool(), False),
]
FINETUNING_SUBSET_ONLY = [
    Field("metadata_file", PathT(), required=True),
    Field("image_dir", PathT(), None),
    Field("alpha_mask", Bool(), False),
]
# Accepted so kohya files load unchanged, but not implemented by this trainer; a value other
# than the default changes what kohya would train, so it earns a warning.
UNSUPPORTED = ("color_aug", "face_crop_aug_range", "secondary_separator", "enable_wildcard", "token_warmup_min",
               "token_warmup_step", "custom_attributes", "resize_interpolation", "alpha_mask", "network_multiplier")


def _names(fields: list[Field]) -> set[str]:
    return {f.name for f in fields}


def _hints() -> dict[str, dict[str, str]]:
    """Messages for known keys in the wrong place (kohya just says "extra keys not allowed")."""
    subset_only = "can only be set in a [[datasets.subsets]] entry"
    dataset_opt = "is a dataset option: set it in [[datasets]] or [general], not in a subset"
    db_only = "only applies to DreamBooth subsets; this dataset is fine-tuning (its subsets have metadata_file)"
    common = {
        "conditioning_data_dir": "kohya's ControlNet datasets are not supported",
        "prior_loss_weight": "is a training option (kohya: --prior_loss_weight): set training.prior_loss_weight",
        "train_batch_size": "is kohya's command-line name; in a dataset config it is batch_size",
        "dataset_repeats": "is kohya's command-line name; in a dataset config it is num_repeats",
    }
    general = {k: subset_only for k in ("image_dir", "is_reg", "alpha_mask", "metadata_file")}
    general["subsets"] = "subsets belong under a [[datasets]] entry: write [[datasets.subsets]]"
    db_dataset = {k: subset_only for k in ("image_dir", "is_reg", "alpha_mask", "metadata_file")}
    ft_dataset = dict(db_dataset, **{k: db_only for k in _names(DREAMBOOTH_FIELDS)})
    db_subset = {k: dataset_opt for k in _names(DATASET_FIELDS) - _names(SUBSET_FIELDS)}
    ft_subset = dict(db_subset, **{k: db_only for k in _names(DREAMBOOTH_FIELDS) | {"is_reg"}})
    return {k: dict(common, **v) for k, v in dict(general=general, db_dataset=db_dataset, ft_dataset=ft_dataset,
                                                     db_subset=db_subset, ft_subset=ft_subset).items()}


_H = _hints()
GENERAL = Schema(DATASET_FIELDS + SUBSET_FIELDS + DREAMBOOTH_FIELDS, _H["general"])
DATASET = {DREAMBOOTH: Schema(DATASET_FIELDS + SUBSET_FIELDS + DREAMBOOTH_FIELDS, _H["db_dataset"]),
           FINETUNING: Schema(DATASET_FIELDS + SUBSET_FIELDS, _H["ft_dataset"])}
SUBSET = {DREAMBOOTH: Schema(SUBSET_FIELDS + DREAMBOOTH_FIELDS + DREAMBOOTH_SUBSET_ONLY, _H["db_subset"]),
          FINETUNING: Schema(SUBSET_FIELDS + FINETUNING_SUBSET_ONLY, _H["ft_subset"])}
TOP_LEVEL = ("general", "datasets")
# Keys that mean "this is a kohya --config_file (training arguments), not a dataset config".
_TRAINING_ARG_KEYS = {"pretrained_model_name_or_path", "output_dir", "network_module", "network_dim",
                      "learning_rate", "max_train_steps", "train_data_dir", "optimizer_type", "save_every_n_epochs"}


@dataclass(frozen=True)
class SubsetConfig:
    source: str  # "datasets[0].subsets[1]"
    kind: str
    options: dict  # every option of its kind, resolved subset → dataset → general → default


@dataclass(frozen=True)
class DatasetEntry:
    source: str
    kind: str
    options: dict  # dataset options, resolved dataset → general → default
    subsets: tuple[SubsetConfig, ...]


@dataclass(frozen=True)
class DatasetConfig:
    datasets: tuple[DatasetEntry, ...]
    file: str | None = None  # the kohya dataset TOML, or None when inline in the main config
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        return {
            "dataset_config": self.file,
            "datasets": [
                {"kind": d.kind, **{k: plain(v) for k, v in d.options.items()},
                 "subsets": [{k: plain(v) for k, v in s.options.items()} for s in d.subsets]}
                for d in self.datasets
            ],
        }


def _kind(source: str, subsets: list, ctx: Context) -> str:
    """kohya's rule: all subsets with metadata_file → fine-tuning, none → DreamBooth."""
    tables = [s for s in subsets if isinstance(s, dict)]
    ft = [i for i, s in enumerate(subsets) if isinstance(s, dict) and "metadata_file" in s]
    if tables and len(ft) == len(tables):
        return FINETUNING
    if not ft:
        return DREAMBOOTH
    db = [i for i, s in enumerate(subsets) if isinstance(s, dict) and "metadata_file" not in s]
    ctx.errors.append(
        f"{source}: DreamBooth subsets ({', '.join(f'subsets[{i}]' for i in db)}: no metadata_file) and"
        f" fine-tuning subsets ({', '.join(f'subsets[{i}]' for i in ft)}: metadata_file) cannot be mixed in"
        " one dataset; split them into separate [[datasets]] entries"
    )
    return DREAMBOOTH


def _first(name: str, layers: list[dict], default):
    for layer in layers:
        if name in layer:
            return layer[name]
    return default


def _check_buckets(source: str, opts: dict, given: bool, ctx: Context, notes: list[str]) -> None:
    res = opts["resolution"]
    if res is None:
        if not given:  # else its bad value is already reported
            ctx.errors.append(f"{source}.resolution is required: set it in this [[datasets]] entry or in [general]")
        return
    step, lo, hi = opts["bucket_reso_steps"], opts["min_bucket_reso"], opts["max_bucket_reso"]
    if not opts["enable_bucket"] or None in (step, lo, hi):  # None: a bad value, already reported
        return
    if lo % step:  # kohya rounds both to the step, down for the minimum and up for the maximum
        notes.append(f"{source}: min_bucket_reso {lo} rounded down to {lo - lo % step} (a multiple of {step})")
        opts["min_bucket_reso"] = lo = lo - lo % step
    if hi % step:
        notes.append(f"{source}: max_bucket_reso {hi} rounded up to {hi + step - hi % step} (a multiple of {step})")
        opts["max_bucket_reso"] = hi = hi + step - hi % step
    if min(res) < lo or max(res) > hi:
        ctx.errors.append(
            f"{source}: resolution {res[0]}x{res[1]} must lie within min_bucket_reso {lo} and max_bucket_reso {hi}"
        )


def resolve(raw: dict, ctx: Context) -> DatasetConfig:
    """Check the dataset tables of ``raw`` and resolve every option; problems go to
    ``ctx.errors`` (relative paths resolve against ``ctx.base_dir``)."""
    notes: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            msg = f"unknown key {key!r} at the top level{suggest(key, TOP_LEVEL)}"
            if key in _TRAINING_ARG_KEYS:
                msg += " (this looks like a kohya training-arguments file, --config_file, not a dataset config)"
            ctx.errors.append(msg)
    general = GENERAL.validate(raw.get("general", {}), "general", ctx, fill_defaults=False)
    datasets_raw = raw.get("datasets", [])
    if not isinstance(datasets_raw, list) or not all(isinstance(d, dict) for d in datasets_raw):
        ctx.errors.append(f"datasets: expected [[datasets]] tables, got {show(datasets_raw)}")
        datasets_raw = []
    if not datasets_raw:
        ctx.errors.append("no [[datasets]] entry: a dataset config needs at least one, with [[datasets.subsets]]")

    datasets = []
    for i, d_raw in enumerate(datasets_raw):
        src = join("datasets", i)
        subsets_raw = d_raw.get("subsets", [])
        if not isinstance(subsets_raw, list) or not subsets_raw:
            ctx.errors.append(f"{src} has no [[datasets.subsets]] entry" if isinstance(subsets_raw, list) else
                              f"{src}.subsets: expected [[datasets.subsets]] tables, got {show(subsets_raw)}")
            subsets_raw = []
        kind = _kind(src, subsets_raw, ctx)
        body = {k: v for k, v in d_raw.items() if k != "subsets"}
        d_set = DATASET[kind].validate(body, src, ctx, fill_defaults=False)
        d_opts = {f.name: _first(f.name, [d_set, general], f.default) for f in DATASET_FIELDS}
        _check_buckets(src, d_opts, "resolution" in d_set or "resolution" in general, ctx, notes)
        if (d_opts["validation_split"] or 0) > 0:
            # kohya would hold those images out of training; ignoring the key would train on them.
            ctx.errors.append(f"{src}.validation_split: validation splits are not supported; remove it"
                              " (kohya would hold these images out of training)")
        subsets = []
        for j, s_raw in enumerate(subsets_raw):
            s_src = join(join(src, "subsets"), j)
            s_kind = FINETUNING if isinstance(s_raw, dict) and "metadata_file" in s_raw else DREAMBOOTH
            schema = SUBSET[s_kind]
            s_set = schema.validate(s_raw, s_src, ctx, fill_defaults=False)
            layers = [s_set, d_set, general]
            opts = {f.name: _first(f.name, layers, f.default) for f in schema.fields.values()}
            subsets.append(SubsetConfig(s_src, s_kind, opts))
        datasets.append(DatasetEntry(src, kind, d_opts, tuple(subsets)))

    notes += _unsupported_notes(datasets)
    return DatasetConfig(tuple(datasets), None, tuple(notes))


def _unsupported_notes(datasets: list[DatasetEntry]) -> list[str]:
    """One warning per unsupported option set to a non-default value, naming where."""
    defaults = {f.name: f.default for f in DATASET_FIELDS + SUBSET_FIELDS + DREAMBOOTH_SUBSET_ONLY}
    used: dict[str, tuple[object, list[str]]] = {}
    for entry in (e for d in datasets for e in (d, *d.subsets)):
        for name in UNSUPPORTED:
            value = entry.options.get(name, defaults[name])
            if value != defaults[name]:
                used.setdefault(name, (value, []))[1].append(entry.source)
    return [f"{name} = {show(list(v) if isinstance(v, tuple) else v)} ({', '.join(srcs)}) is accepted for kohya"
            " compatibility but not implemented by this trainer: it has no effect"
            for name, (v, srcs) in used.items()]


def read_dataset_file(path: str) -> dict:
    """A kohya dataset config file: TOML, or JSON as kohya also accepts."""
    if path.lower().endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise ConfigError([f"file not found: {path}"]) from None
        except json.JSONDecodeError as e:
            raise ConfigError([f"line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}"], path) from None
    return load_toml(path)


def resolve_file(path: str) -> DatasetConfig:
    """Check a standalone kohya dataset file; relative paths in it resolve against its folder."""
    path = os.path.abspath(path)
    ctx = Context([], base_dir=os.path.dirname(path))
    cfg = resolve(read_dataset_file(path), ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors, path)
    return DatasetConfig(cfg.datasets, path, cfg.warnings)


# --------------------------------------------------------------------------------- the plan


def _caption_options(o: dict) -> CaptionOptions:
    return CaptionOptions(
        shuffle_caption=o["shuffle_caption"], keep_tokens=o["keep_tokens"],
        keep_tokens_separator=o["keep_tokens_separator"], caption_separator=o["caption_separator"],
        caption_prefix=o["caption_prefix"] or "", caption_suffix=o["caption_suffix"] or "",
        caption_dropout_rate=o["caption_dropout_rate"],
        caption_dropout_every_n_epochs=o["caption_dropout_every_n_epochs"],
        caption_tag_dropout_rate=o["caption_tag_dropout_rate"],
    )


def _build_dataset(d: DatasetEntry, problems: list[str], notes: list[str]) -> DatasetSpec:
    o = d.options
    buckets = BucketOptions(tuple(o["resolution"]), o["enable_bucket"], o["min_bucket_reso"], o["max_bucket_reso"],
                            o["bucket_reso_steps"], o["bucket_no_upscale"])
    spec = DatasetSpec(d.kind, o["batch_size"], buckets, source=d.source)
    used: dict[str, str] = {}  # image_dir / metadata_file of subsets already taken → their source
    for s in d.subsets:
        so = s.options
        is_reg = bool(so.get("is_reg", False))
        key = so["metadata_file"] if s.kind == FINETUNING else so["image_dir"]
        skipped, found = "", []
        if so["num_repeats"] < 1:  # kohya's way to switch a subset off
            skipped = "num_repeats < 1"
            notes.append(f"{s.source}: num_repeats is {so['num_repeats']}, so kohya ignores this subset")
        elif key in used:
            skipped = f"duplicate of {used[key]}"
            notes.append(f"{s.source}: same {'metadata_file' if s.kind == FINETUNING else 'image_dir'} as"
                         f" {used[key]} in the same dataset; kohya ignores the later one")
        else:
            scan = scan_finetuning if s.kind == FINETUNING else scan_dreambooth
            found = scan(s.source, so, problems, notes)
            if found:
                used[key] = s.source
            else:
                skipped = "no images"
        index = len(spec.subsets)
        spec.subsets.append(SubsetInfo(s.source, so["image_dir"], so.get("metadata_file"), so["num_repeats"],
                                       is_reg, len(found), skipped, so.get("class_tokens")))
        captions, augment = _caption_options(so), AugmentOptions(so["flip_aug"], so["random_crop"])
        spec.items += [ImageItem(f.path, f.caption, so["num_repeats"], is_reg, captions, augment, f.size, index)
                       for f in found]
    train = sum(i.repeats for i in spec.items if not i.is_reg)
    reg = sum(i.repeats for i in spec.items if i.is_reg)
    if reg and not train:
        notes.append(f"{d.source}: regularization images but no training images; kohya uses no reg images then")
    elif reg > train:
        notes.append(f"{d.source}: {reg} reg images × repeats for {train} train images × repeats; as in kohya, only"
                     " the first reg images (up to the train count) are used each epoch")
    return spec


def build_plan(cfg: DatasetConfig, prior_loss_weight: float = 1.0) -> DatasetPlan:
    """Read every subset from disk; raise one ConfigError with every problem found."""
    problems: list[str] = []
    notes = list(cfg.warnings)
    specs = [_build_dataset(d, problems, notes) for d in cfg.datasets]
    if not problems and not any(not i.is_reg for s in specs for i in s.items):
        problems.append("no training images found in any subset")
    if problems:
        raise ConfigError(problems, cfg.file)
    return DatasetPlan(specs, prior_loss_weight, notes)


def load_dataset_config(path: str, prior_loss_weight: float = 1.0) -> DatasetPlan:
    """A standalone kohya dataset TOML/JSON → DatasetPlan."""
    return build_plan(resolve_file(path), prior_loss_weight)


def effective_repeats(spec: DatasetSpec) -> list[int]:
    """Per item, how often kohya shows it per epoch (``plan.balanced_repeats``)."""
    return balanced_repeats(spec.items)


def plan_summary(plan: DatasetPlan) -> dict:
    """Counts for ``--dry-run``: per dataset and subset, images, repeats and their product."""
    datasets, total = [], {"train_images": 0, "train_images_x_repeats": 0, "reg_images": 0, "samples_per_epoch": 0}
    for spec in plan.datasets:
        eff = effective_repeats(spec)
        subsets = []
        for k, s in enumerate(spec.subsets):
            rows = [n for n, item in enumerate(spec.items) if item.subset == k]
            subsets.append({
                "source": s.source, "image_dir": s.image_dir, "metadata_file": s.metadata_file, "is_reg": s.is_reg,
                "images": s.image_count, "num_repeats": s.num_repeats, "images_x_repeats": s.image_count * s.num_repeats,
                "used_per_epoch": sum(eff[n] for n in rows), "skipped": s.skipped,
            })
        train = [i for i in spec.items if not i.is_reg]
        reg = [i for i in spec.items if i.is_reg]
        samples = sum(eff)
        ds = {
            "source": spec.source, "kind": spec.kind, "resolution": list(spec.buckets.resolution),
            "batch_size": spec.batch_size, "enable_bucket": spec.buckets.enable_bucket,
            "train_images": len(train), "train_images_x_repeats": sum(i.repeats for i in train),
            "reg_images": len(reg), "reg_images_x_repeats": sum(i.repeats for i in reg),
            "samples_per_epoch": samples,
            # exact without buckets; with buckets each bucket rounds up on its own
            "batches_per_epoch_min": math.ceil(samples / spec.batch_size),
            "subsets": subsets,
        }
        datasets.append(ds)
        for key in total:
            total[key] += ds[key]
    return {"datasets": datasets, "total": total, "prior_loss_weight": plan.prior_loss_weight,
            "warnings": list(plan.warnings)}
