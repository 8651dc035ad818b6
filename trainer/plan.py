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


@dataclass(frozen=True)
class BucketOptions:
    resolution: tuple[int, int] = (1024, 1024)  # (width, height)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass
class DatasetSpec:
    """One [[datasets]] entry."""

    kind: str  # "dreambooth" or "finetuning"
    batch_size: int
    buckets: BucketOptions
    items: list[ImageItem] = field(default_factory=list)
    source: str = ""  # where it was declared, for messages ("datasets[0]")


@dataclass
class DatasetPlan:
    datasets: list[DatasetSpec]
    prior_loss_weight: float = 1.0
