"""Aspect-ratio bucketing with kohya sd-scripts' rules.

Read against kohya-ss/sd-scripts (v0.10.1, 48d368fa): ``library/model_util.py``
``make_bucket_resolutions``; ``library/train_util.py`` ``BucketManager.select_bucket`` /
``round_to_steps``, ``BaseDataset.adjust_min_max_bucket_reso_by_steps``,
``BaseDataset.make_buckets`` and ``trim_and_resize_if_required``. The code here is our own;
the arithmetic (integer flooring, ``int(x + 0.5)`` rounding, the first-minimum tie-break) is
kept identical because it decides which bucket an image lands in, and therefore the number of
steps per epoch.

All sizes are (width, height), as in kohya and PIL. SDXL's (h, w) conditioning is built in
``trainer.data``.
"""

from __future__ import annotations

import math
import random

from qrlora.errors import UserError

from .plan import BucketOptions

Size = tuple[int, int]


class ImageTooSmall(UserError):
    """An image that ``bucket_no_upscale`` cannot fit into any bucket (callers add its path)."""


def adjusted_min_max(opts: BucketOptions) -> tuple[int, int]:
    """kohya's ``adjust_min_max_bucket_reso_by_steps``: min rounds *down*, max rounds *up* to a
    multiple of ``bucket_reso_steps``; the resolution must lie within them."""
    steps = opts.bucket_reso_steps
    if steps <= 0:
        raise ValueError(f"bucket_reso_steps must be positive, got {steps}")
    lo = opts.min_bucket_reso - opts.min_bucket_reso % steps
    hi = opts.max_bucket_reso
    if hi % steps:
        hi = hi + steps - hi % steps
    w, h = opts.resolution
    if min(w, h) < lo:
        raise ValueError(f"min_bucket_reso ({lo}) must not exceed the smaller side of resolution {opts.resolution}")
    if max(w, h) > hi:
        raise ValueError(f"max_bucket_reso ({hi}) must not be below the larger side of resolution {opts.resolution}")
    return lo, hi


def make_buckets(opts: BucketOptions) -> list[Size]:
    """The predefined bucket list, sorted by (width, height) as kohya sorts it.

    - ``enable_bucket = false``: the single resolution bucket (every image is resized to cover
      it and cropped).
    - ``bucket_no_upscale = true``: ``[]``; kohya derives each image's bucket from its own size
      (see :func:`select_bucket`) and ignores min/max.
    - otherwise: equal-area (w, h) pairs with area <= resolution's area, both sides multiples of
      ``bucket_reso_steps`` within [min, max], plus the square of side floor(sqrt(area)/steps)*steps.
    """
    if not opts.enable_bucket:
        return [tuple(opts.resolution)]
    lo, hi = adjusted_min_max(opts)  # kohya validates even when no_upscale ignores the values
    if opts.bucket_no_upscale:
        return []
    steps = opts.bucket_reso_steps
    area = opts.resolution[0] * opts.resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    resos = {(side, side)}
    width = lo
    while width <= hi:
        # The other side: the largest multiple of steps keeping w*h <= area, capped at max.
        height = min(hi, int((area // width) // steps) * steps)
        if height >= lo:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def _round_to_steps(x: float, steps: int) -> int:
    # kohya's BucketManager.round_to_steps: round half up, then floor to a multiple of steps.
    v = int(x + 0.5)
    return v - v % steps


def _no_upscale_resize(size_wh: Size, opts: BucketOptions) -> Size:
    """kohya's no-upscale resize target: the image itself, or, when its area exceeds the
    resolution's, a same-aspect downscale whose rounded side gives the smaller aspect error."""
    w, h = size_wh
    max_area = opts.resolution[0] * opts.resolution[1]
    if w * h <= max_area:
        return (w, h)
    ar = w / h
    rw = math.sqrt(max_area * ar)
    rh = max_area / rw
    steps = opts.bucket_reso_steps
    bw = _round_to_steps(rw, steps)  # round the width, derive the height
    ar_w = bw / _round_to_steps(bw / ar, steps)
    bh = _round_to_steps(rh, steps)  # round the height, derive the width
    ar_h = _round_to_steps(bh * ar, steps) / bh
    if abs(ar_w - ar) < abs(ar_h - ar):
        return (bw, int(bw / ar + 0.5))
    return (int(bh * ar + 0.5), bh)


def cover_size(size_wh: Size, bucket_wh: Size) -> Size:
    """Scale the image so it covers the bucket, matching the side kohya matches: the height when
    the image is wider than the bucket, else the width; other side rounded half up."""
    w, h = size_wh
    bw, bh = bucket_wh
    if w / h > bw / bh:
        scale = bh / h
    else:
        scale = bw / w
    return (int(w * scale + 0.5), int(h * scale + 0.5))


def select_bucket(size_wh: Size, opts: BucketOptions, buckets: list[Size]) -> tuple[Size, Size]:
    """kohya's ``BucketManager.select_bucket``: returns ``(bucket_wh, resized_wh)``.

    With predefined buckets (``enable_bucket`` off, or on without ``bucket_no_upscale``): an
    image whose exact size is a bucket uses it; otherwise the bucket with the smallest
    ``|bucket_w/bucket_h - w/h|`` wins, the first in ``buckets`` order on ties (kohya's
    ``np.argmin`` over its sorted list, so pass the list :func:`make_buckets` returns).
    With ``bucket_no_upscale``: the resize target of :func:`_no_upscale_resize`, floored to
    steps on each side (the image is never scaled up; it is cropped, never padded).
    """
    w, h = size_wh
    if w <= 0 or h <= 0:
        raise ValueError(f"invalid image size {size_wh}")
    if opts.enable_bucket and opts.bucket_no_upscale:
        resized = _no_upscale_resize(size_wh, opts)
        steps = opts.bucket_reso_steps
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if bucket[0] == 0 or bucket[1] == 0:
            raise ImageTooSmall(f"{w}x{h} is smaller than bucket_reso_steps = {steps} on one side, and "
                                "bucket_no_upscale never enlarges an image; remove it, upscale it or lower "
                                "bucket_reso_steps (kohya does not check this: it stops with a ZeroDivisionError "
                                "when the height is too small and crops the image to nothing when the width is)")
        return bucket, resized
    if not buckets:
        raise ValueError("no predefined buckets (bucket_no_upscale builds them per image)")
    if (w, h) in buckets:
        bucket = (w, h)
    else:
        ar = w / h
        errors = [abs(bw / bh - ar) for bw, bh in buckets]
        bucket = buckets[errors.index(min(errors))]  # first minimum, like np.argmin
    return tuple(bucket), cover_size(size_wh, bucket)


def assign_bucket(size_wh: Size, opts: BucketOptions, buckets: list[Size]) -> Size:
    """The bucket (w, h) for an image of ``size_wh`` (see :func:`select_bucket`)."""
    return select_bucket(size_wh, opts, buckets)[0]


def crop_geometry(
    size_wh: Size,
    bucket_wh: Size,
    random_crop: bool,
    rng: random.Random | None = None,
    resized_wh: Size | None = None,
) -> tuple[Size, Size]:
    """Where an image goes in its bucket: ``(resized_wh, (crop_left, crop_top))``.

    The image is resized to ``resized_wh`` (default: :func:`cover_size`; pass the second value
    of :func:`select_bucket` for ``bucket_no_upscale``), then the bucket-sized window at
    ``(crop_left, crop_top)`` of the resized image is kept. As in kohya's
    ``trim_and_resize_if_required``: centred offsets are ``excess // 2``; random ones are
    ``rng.randint(0, excess)``, drawn for the width first, then the height, and only for a side
    that has excess.
    """
    resized = tuple(resized_wh) if resized_wh is not None else cover_size(size_wh, bucket_wh)
    offsets = []
    for length, target in zip(resized, bucket_wh):
        excess = length - target
        if excess < 0:
            raise ValueError(f"resized size {resized} does not cover bucket {bucket_wh}")
        if excess == 0:
            offsets.append(0)
        elif random_crop:
            if rng is None:
                raise ValueError("random_crop needs an rng")
            offsets.append(rng.randint(0, excess))
        else:
            offsets.append(excess // 2)
    return resized, (offsets[0], offsets[1])


def kohya_crop_ltrb(bucket_wh: Size, size_wh: Size) -> tuple[float, float, float, float]:
    """What kohya stores as the SDXL crop (``BucketManager.get_crop_ltrb``), for comparison only.

    kohya computes it as if the image were *fitted inside* the bucket (letterboxed), so for a
    centre-cropped tall image it reports a left margin and top 0, not the rows actually cut.
    We condition on the real crop instead (diffusers' convention); see ``trainer.data``.
    """
    bw, bh = bucket_wh
    ar = size_wh[0] / size_wh[1]
    if bw / bh > ar:
        rw, rh = bh * ar, bh
    else:
        rw, rh = bw, bw / ar
    left = (bw - rw) // 2
    top = (bh - rh) // 2
    return left, top, left + rw, top + rh
