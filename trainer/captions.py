"""Caption processing with kohya sd-scripts' semantics.

Read against kohya-ss/sd-scripts (v0.10.1, 48d368fa) ``library/train_util.py``:
``BaseDataset.process_caption`` and ``BaseDataset.set_tag_frequency``. Our own code; the order
of random draws is kept the same as kohya's (one draw for caption dropout only when its rate is
positive, then ``shuffle`` of the flexible tags, then one draw per remaining tag for tag
dropout), so with a ``random.Random`` in the same state as kohya's global ``random`` the result
is the same caption.

Options kohya has that :class:`~trainer.plan.CaptionOptions` does not carry (wildcards,
``secondary_separator``, token warm-up, textual-inversion replacements) are not implemented;
the multi-line rule of the no-wildcard case (use the first line) is.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable

from .plan import CaptionOptions, DatasetPlan, ImageItem


def _split(text: str, sep: str) -> list[str]:
    # kohya strips each tag and, in the keep_tokens_separator branch, drops empty ones.
    return [t.strip() for t in text.split(sep) if t.strip()]


def process_caption(caption: str, opts: CaptionOptions, epoch: int, rng: random.Random) -> str:
    """The caption the text encoder sees for one sample.

    ``epoch`` is kohya's 1-based ``current_epoch`` (the first epoch is 1): with
    ``caption_dropout_every_n_epochs = n`` every epoch divisible by n trains on "".

    Steps, as in kohya:
      1. ``caption_prefix + " " + caption + " " + caption_suffix`` (each only when non-empty);
         the prefix therefore joins the first tag and counts for ``keep_tokens``.
      2. Whole-caption dropout (``caption_dropout_rate``, or the epoch rule) -> "".
      3. Only the first line of a multi-line caption is used.
      4. Only when ``shuffle_caption`` or ``caption_tag_dropout_rate > 0``: split on
         ``caption_separator``; the fixed head is everything before ``keep_tokens_separator``
         (and a second separator marks a fixed tail) when the separator occurs, else the first
         ``keep_tokens`` tags; the rest is shuffled, then each tag dropped with the tag rate;
         re-joined with ", ". Kept tags are never shuffled or dropped.
         Otherwise the caption is left as is (kohya leaves a ``keep_tokens_separator`` in it
         verbatim in that case, and so do we).
    """
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    # Short-circuit: no random draw when the rate is 0, to stay in step with kohya's RNG use.
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    n = opts.caption_dropout_every_n_epochs
    if dropped or (n > 0 and epoch % n == 0):
        return ""

    caption = caption.split("\n")[0]
    if not (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0):
        return caption

    sep = opts.caption_separator
    ksep = opts.keep_tokens_separator
    fixed: list[str] = []
    tail: list[str] = []
    if ksep and ksep in caption:
        head, flex_text = caption.split(ksep, 1)
        if ksep in flex_text:
            flex_text, tail_text = flex_text.split(ksep, 1)
            tail = _split(tail_text, sep)
        fixed = _split(head, sep)
        flex = _split(flex_text, sep)
    else:
        # kohya keeps empty tags here (only strips), e.g. a trailing separator.
        tags = [t.strip() for t in caption.strip().split(sep)]
        k = max(opts.keep_tokens, 0)
        fixed, flex = tags[:k], tags[k:]

    if opts.shuffle_caption:
        rng.shuffle(flex)
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + tail)


def is_deterministic(opts: CaptionOptions) -> bool:
    """True when :func:`process_caption` needs no randomness (the epoch rule aside), so its
    text-encoder output can be cached once (kohya refuses TE caching otherwise)."""
    return not (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or opts.caption_dropout_rate > 0)


def _folder_of(item: ImageItem) -> str:
    return os.path.basename(os.path.dirname(item.path))


def _count(items: Iterable[ImageItem], group: Callable[[ImageItem], str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, str]] = set()
    for item in items:
        name = group(item)
        if item.repeats < 1 or (name, item.path) in seen:  # kohya skips num_repeats < 1 subsets
            continue
        seen.add((name, item.path))
        freq = out.setdefault(name, {})
        for tag in item.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return out


def tag_frequency(source: DatasetPlan | Iterable[ImageItem]) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: ``{subset folder or metadata file name: {tag: count}}``.

    As kohya (``set_tag_frequency`` and the merge in ``train_network.py``): the raw caption (no
    prefix/suffix or processing) split on "," whatever the ``caption_separator``, tags stripped
    and lower-cased, empty ones skipped, each image counted once (not times its repeats), reg
    images included; within a dataset, subsets with the same folder name add up; across
    datasets, a name already seen in an earlier dataset is not counted again.

    Given a :class:`DatasetPlan`, names come from its subsets (``basename(image_dir)``, or of
    ``metadata_file`` for fine-tuning); given bare items, from each image's folder, and each
    (folder, image) pair is counted once. Deviations: a trailing "/" on ``image_dir`` is ignored
    (kohya's key would be ""), and fine-tuning subsets count the whole caption where kohya counts
    only the metadata's ``tags`` field, which :class:`ImageItem` does not keep apart.
    """
    if not isinstance(source, DatasetPlan):
        return _count(source, _folder_of)
    merged: dict[str, dict[str, int]] = {}
    for spec in source.datasets:

        def group(item: ImageItem, spec=spec) -> str:
            if item.subset < len(spec.subsets):
                info = spec.subsets[item.subset]
                where = info.image_dir or info.metadata_file
                if where:
                    return os.path.basename(where.rstrip("/\\"))
            return _folder_of(item)

        for name, freq in _count(spec.items, group).items():
            merged.setdefault(name, freq)  # first dataset wins, as kohya's merge
    return merged
