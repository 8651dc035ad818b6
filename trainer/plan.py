"""What the dataset config resolves to, before any image is opened.

``trainer.dataset_config`` builds these from kohya's dataset TOML; ``trainer.data`` turns
them into batches. Field names and defaults follow kohya's sd-scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption processing (kohya semantics)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0  # leading tokens never shuffled or dropped
    keep_tokens_separator: str = ""  # if set, everything before it is kept
    caption_separator: str = ","
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0  # whole caption -> ""
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0  # each tag (after keep_tokens) dropped with this rate


@dataclass(frozen=True)
class AugmentOptions:
    flip_aug: bool = False
    random_crop: bool = False


@dataclass(frozen=True)
class ImageItem:
    path: str  # absolute image path
    caption: str  # raw caption, before shuffle/dropout/prefix
    repeats: int  # num_repeats of its subset
    is_reg: bool
    captions: CaptionOptions = CaptionOptions()
    augment: AugmentOptions = AugmentOptions()
    size: tuple[int, int] | None = None  # (width, height) when known without decoding (metadata files)
    subset: int = 0  # index into its DatasetSpec.subsets


@dataclass(frozen=True)
class BucketOptions:
    resolution: tuple[int, int] = (1024, 1024)  # (width, height)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass(frozen=True)
class SubsetInfo:
    """One [[datasets.subsets]] entry as read from disk (for summaries and metadata)."""

    source: str  # "datasets[0].subsets[1]"
    image_dir: str | None
    metadata_file: str | None
    num_repeats: int
    is_reg: bool
    image_count: int  # images found; 0 when skipped
    skipped: str = ""  # why kohya ignores this subset ("num_repeats < 1", "duplicate of ...", "no images")
    class_tokens: str | None = None


@dataclass
class DatasetSpec:
    """One [[datasets]] entry."""

    kind: str  # "dreambooth" or "finetuning"
    batch_size: int
    buckets: BucketOptions
    items: list[ImageItem] = field(default_factory=list)
    source: str = ""  # where it was declared, for messages ("datasets[0]")
    subsets: list[SubsetInfo] = field(default_factory=list)


@dataclass
class DatasetPlan:
    datasets: list[DatasetSpec]
    prior_loss_weight: float = 1.0
    warnings: list[str] = field(default_factory=list)  # kohya surprises worth telling the user


def balanced_repeats(items: list[ImageItem]) -> list[int]:
    """Samples per epoch of each item of one dataset (kohya's DreamBoothDataset rule).

    - Train items: ``repeats`` each; items with ``repeats < 1`` are left out (kohya ignores such
      subsets).
    - Reg items, taken in plan order, are "registered" with their own ``repeats`` until the
      running total reaches the train total T; if a pass over all reg items falls short, the
      next passes add 1 to each in turn, again stopping as soon as the total reaches T.
      So reg samples per epoch = T when the first pass ends short of T (the usual case: few
      repeats on reg), but can exceed T by up to ``repeats - 1`` when the first pass overshoots,
      and reg items after the stopping point get 0. No train samples => no reg samples.
    """
    counts = [0] * len(items)
    train_total = 0
    regs = []
    for i, it in enumerate(items):
        if it.repeats < 1:
            continue
        if it.is_reg:
            regs.append(i)
        else:
            counts[i] = it.repeats
            train_total += it.repeats
    n = 0
    first_pass = True
    while regs and n < train_total:
        for i in regs:
            step = items[i].repeats if first_pass else 1
            counts[i] += step
            n += step
            if n >= train_total:
                break
        first_pass = False
    return counts
