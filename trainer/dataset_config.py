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

from .dataset_scan import concept_folders, list_images, scan_dreambooth, scan_finetuning
from .plan import (AugmentOptions, BucketOptions, CaptionOptions, DatasetPlan, DatasetSpec, ImageItem, SubsetInfo,
                   balanced_repeats)
from .schema import (
    AnyTable, Bool, CliValue, ConfigError, Context, Enum, Field, Float, Int, Pair, PathT, Schema, Str, join, show,
    suggest,
)
from .tomlfile import load_toml

DREAMBOOTH, FINETUNING = "dreambooth", "finetuning"
_INTERP = Enum("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

def _kohya(name: str, type, default=None, help: str = "", required: bool = False) -> Field:
    """A dataset option: every one keeps kohya's dataset-TOML name."""
    return Field(name, type, default, required, help, kohya=name)


# Defaults are kohya's *effective* ones: its argparse defaults, which win over its dataclass
# defaults because argparse values are always present in the lookup chain.
DATASET_FIELDS = [
    _kohya("resolution", Pair(Int(min=1), scalar_ok=True, names=("width", "height")), None,
           "training size, e.g. 1024 or [1024, 768]; required in [general] or each [[datasets]]"),
    _kohya("batch_size", Int(min=1), 1, "images per batch (kohya's --train_batch_size)"),
    _kohya("enable_bucket", Bool(), False, "aspect-ratio buckets instead of one square crop"),
    _kohya("min_bucket_reso", Int(min=1), 256, "smallest bucket side; rounded down to bucket_reso_steps"),
    _kohya("max_bucket_reso", Int(min=1), 1024, "largest bucket side; rounded up to bucket_reso_steps"),
    _kohya("bucket_reso_steps", Int(min=1), 64, "bucket sides are multiples of this"),
    _kohya("bucket_no_upscale", Bool(), False, "buckets from each image's own size, never enlarged"),
    _kohya("network_multiplier", Float(), 1.0, "accepted for kohya files; not implemented (warns)"),
    _kohya("validation_seed", Int(), None, "accepted for kohya files; validation splits are not supported"),
    _kohya("validation_split", Float(min=0, max=1), 0.0, "must stay 0: validation splits are not supported"),
    _kohya("resize_interpolation", _INTERP, None, "accepted for kohya files; not implemented (warns)"),
]
SUBSET_FIELDS = [  # allowed at all three levels
    _kohya("num_repeats", Int(), 1, "times each image is shown per epoch; < 1 switches the subset off"),
    _kohya("shuffle_caption", Bool(), False, "shuffle the caption's tags every time (after keep_tokens)"),
    _kohya("caption_separator", Str(), ",", "what separates tags in a caption"),
    _kohya("keep_tokens", Int(min=0), 0, "leading tags never shuffled or dropped"),
    _kohya("keep_tokens_separator", Str(), "", "if set, everything before it is kept in place"),
    _kohya("secondary_separator", Str(), None, "accepted for kohya files; not implemented (warns)"),
    _kohya("enable_wildcard", Bool(), False, "accepted for kohya files; not implemented (warns)"),
    _kohya("caption_prefix", Str(), None, "text put before every caption"),
    _kohya("caption_suffix", Str(), None, "text put after every caption"),
    _kohya("color_aug", Bool(), False, "accepted for kohya files; not implemented (warns)"),
    _kohya("flip_aug", Bool(), False, "random horizontal flips"),
    _kohya("random_crop", Bool(), False, "random instead of centred crops (no latent cache then)"),
    _kohya("face_crop_aug_range", Pair(Float(), names=("low", "high")), None,
           "accepted for kohya files; not implemented (warns)"),
    _kohya("token_warmup_min", Int(), 1, "accepted for kohya files; not implemented (warns)"),
    _kohya("token_warmup_step", Float(min=0, keep_int=True), 0, "accepted for kohya files; not implemented (warns)"),
    _kohya("custom_attributes", AnyTable(), None, "accepted for kohya files; not implemented (warns)"),
    _kohya("resize_interpolation", _INTERP, None, "accepted for kohya files; not implemented (warns)"),
    _kohya("caption_dropout_rate", Float(min=0, max=1), 0.0, "chance of training an image with an empty caption"),
    _kohya("caption_dropout_every_n_epochs", Int(min=0), 0, "every N-th epoch, all captions are empty"),
    _kohya("caption_tag_dropout_rate", Float(min=0, max=1), 0.0, "chance of dropping each tag (after keep_tokens)"),
]
DREAMBOOTH_FIELDS = [  # DreamBooth only, but may be inherited from the dataset or [general]
    _kohya("caption_extension", Str(), ".caption", "caption file next to each image; kohya's default is"
           " .caption, most taggers write .txt"),
    _kohya("class_tokens", Str(), None, "caption for images without a caption file"),
    _kohya("cache_info", Bool(), False, "accepted for kohya files; has no effect here"),
]
DREAMBOOTH_SUBSET_ONLY = [
    _kohya("image_dir", PathT(), help="the folder that directly holds the images (not recursive)", required=True),
    _kohya("is_reg", Bool(), False, "regularization images (loss weighted by training.prior_loss_weight)"),
    _kohya("alpha_mask", Bool(), False, "accepted for kohya files; not implemented (warns)"),
]
FINETUNING_SUBSET_ONLY = [
    _kohya("metadata_file", PathT(), help="kohya's JSON or JSONL of image keys, captions and tags", required=True),
    _kohya("image_dir", PathT(), None, "folder the metadata's relative image keys are relative to"),
    _kohya("alpha_mask", Bool(), False, "accepted for kohya files; not implemented (warns)"),
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
    written: str | None = None  # image_dir (DreamBooth) or metadata_file as written, before resolving


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
            where = "this [[datasets]] entry or in [general]" if source.startswith("datasets") else "[general]"
            ctx.errors.append(f"{source}.resolution is required: set it in {where}")
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


def resolve(raw: dict, ctx: Context, names: dict[str, str] | None = None) -> DatasetConfig:
    """Check the dataset tables of ``raw`` and resolve every option; problems go to
    ``ctx.errors`` (relative paths resolve against ``ctx.base_dir``). ``names`` renames
    generated entries in messages ("datasets[0].subsets[1]" → "train_data_dir/10_sks dog")."""
    names = names or {}
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
        src = names.get(join("datasets", i), join("datasets", i))
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
            s_src = join(join(join("datasets", i), "subsets"), j)
            s_src = names.get(s_src, s_src)
            s_kind = FINETUNING if isinstance(s_raw, dict) and "metadata_file" in s_raw else DREAMBOOTH
            schema = SUBSET[s_kind]
            s_set = schema.validate(s_raw, s_src, ctx, fill_defaults=False)
            layers = [s_set, d_set, general]
            opts = {f.name: _first(f.name, layers, f.default) for f in schema.fields.values()}
            written = s_raw.get("metadata_file" if s_kind == FINETUNING else "image_dir") if isinstance(s_raw, dict) \
                else None
            written = written.raw if isinstance(written, CliValue) else written
            subsets.append(SubsetConfig(s_src, s_kind, opts, written if isinstance(written, str) else None))
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


# kohya's training arguments that describe a dataset without a dataset config.
FOLDER_KEYS = ("train_data_dir", "reg_data_dir", "in_json")


def folder_tables(folders: dict[str, str], ctx: Context) -> tuple[dict, dict[str, str], list[str]]:
    """The [[datasets]] table kohya's train_network.py builds without a dataset config.

    ``train_data_dir`` (and ``reg_data_dir``, with ``is_reg``): one subset per sub-folder named
    ``<repeats>_<class tokens>`` (``10_sks dog``); other sub-folders are skipped with a warning,
    as kohya does. With ``in_json``: one fine-tuning subset, the metadata file with
    ``train_data_dir`` as its image_dir. Returns the tables, the names of the generated entries
    (for messages) and warnings; problems go to ``ctx.errors``. Paths are already resolved."""
    notes: list[str] = []
    names = {"datasets[0]": "train_data_dir"}
    if "in_json" in folders:
        if "reg_data_dir" in folders:
            ctx.errors.append("reg_data_dir: regularization folders only apply to train_data_dir's concept folders;"
                              " with in_json (fine-tuning) kohya ignores reg_data_dir without a word, so remove one")
        subset = {"metadata_file": folders["in_json"]}
        if "train_data_dir" in folders:
            subset["image_dir"] = folders["train_data_dir"]
        names = {"datasets[0]": "in_json", "datasets[0].subsets[0]": "in_json"}
        return {"datasets": [{"subsets": [subset]}]}, names, notes
    if "train_data_dir" not in folders:
        ctx.errors.append("reg_data_dir needs train_data_dir: the regularization images are balanced against"
                          " train_data_dir's training images")
        return {}, names, notes
    subsets: list[dict] = []
    for key, is_reg in (("train_data_dir", False), ("reg_data_dir", True)):
        parent = folders.get(key)
        if parent is None:
            continue
        if not os.path.isdir(parent):  # kohya silently finds nothing; nearly always a typo
            what = "is a file, not a folder" if os.path.exists(parent) else "does not exist"
            ctx.errors.append(f"{key}: {parent} {what}")
            continue
        taken = 0
        for c in concept_folders(parent):
            if c.repeats is None:
                notes.append(f"{key}: sub-folder {c.name!r} is skipped: its name does not start with"
                             " '<repeats>_' (e.g. '10_sks dog'); kohya skips it too")
            elif c.repeats < 1:
                notes.append(f"{key}: sub-folder {c.name!r} has {c.repeats} repeats, so it is skipped, as in kohya")
            else:
                names[f"datasets[0].subsets[{len(subsets)}]"] = f"{key}/{c.name}"
                subsets.append({"image_dir": c.path, "num_repeats": c.repeats, "is_reg": is_reg,
                                "class_tokens": c.class_tokens})
                taken += 1
        loose = list_images(parent)
        if loose:
            notes.append(f"{key}: {len(loose)} images directly in {parent} are not used: kohya reads only its"
                         f" '<repeats>_<class tokens>' sub-folders; move them into one, e.g."
                         f" '10_{os.path.basename(parent)}'")
        if not taken and not is_reg:
            ctx.errors.append(f"{key}: {parent} has no '<repeats>_<class tokens>' sub-folder (e.g. '10_sks dog'"
                              " for 10 repeats of its images with the class tokens 'sks dog')")
    return {"datasets": [{"subsets": subsets}]}, names, notes


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
    used: dict[str, SubsetConfig] = {}  # image_dir / metadata_file of subsets already taken → that subset
    for s in d.subsets:
        so = s.options
        is_reg = bool(so.get("is_reg", False))
        key = so["metadata_file"] if s.kind == FINETUNING else so["image_dir"]
        skipped, found = "", []
        if so["num_repeats"] < 1:  # kohya's way to switch a subset off
            skipped = "num_repeats < 1"
            notes.append(f"{s.source}: num_repeats is {so['num_repeats']}, so kohya ignores this subset")
        elif key in used:
            skipped = f"duplicate of {used[key].source}"
            notes.append(_duplicate_note(s, used[key]))
        else:
            scan = scan_finetuning if s.kind == FINETUNING else scan_dreambooth
            found = scan(s.source, so, problems, notes)
            if found:
                used[key] = s
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


def _duplicate_note(later: SubsetConfig, first: SubsetConfig) -> str:
    """Two subsets of one dataset name the same folder (or metadata file): this trainer keeps the
    first. kohya compares the two strings as written, so its outcome depends on the spelling."""
    what = "metadata_file" if later.kind == FINETUNING else "image_dir"
    head = f"{later.source}: same {what} as {first.source} in the same dataset, so this subset is skipped"
    a, b = first.written, later.written
    if a is None or b is None or a == b:
        return head + " (kohya skips it too)"
    if later.kind == FINETUNING:
        kohya = "kohya compares the paths as written, so it would read the file twice and train its images twice"
    elif os.path.join(a, "x") == os.path.join(b, "x"):  # e.g. "imgs" and "imgs/": the same image paths
        kohya = ("kohya compares the paths as written and keeps both subsets, but their images get the same"
                 " paths, so it trains each once with the later subset's options")
    else:
        kohya = ("kohya compares the paths as written, so it would keep both subsets and train each image twice"
                 " (once per subset, with each subset's num_repeats)")
    return f"{head}: {b!r} and {a!r} are one folder here; {kohya}"


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


def image_counts(plan: DatasetPlan) -> str:
    """The image counts in words, saying which include repeats: "5 train images (50 with
    repeats) + 4 reg images (8 with repeats, 50 used per epoch)"."""
    train = [i for spec in plan.datasets for i in spec.items if not i.is_reg and i.repeats > 0]
    reg = [i for spec in plan.datasets for i in spec.items if i.is_reg and i.repeats > 0]
    text = f"{len(train)} train images ({sum(i.repeats for i in train)} with repeats)"
    if reg:
        used = sum(n for spec in plan.datasets for n, i in zip(effective_repeats(spec), spec.items) if i.is_reg)
        text += f" + {len(reg)} reg images ({sum(i.repeats for i in reg)} with repeats, {used} used per epoch)"
    return text


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
    return {"datasets": datasets, "total": total, "images": image_counts(plan),
            "prior_loss_weight": plan.prior_loss_weight, "warnings": list(plan.warnings)}
