"""Aspect-ratio bucketing against kohya's rules.

Expected values are derived by hand below from kohya-ss/sd-scripts v0.10.1 (48d368fa):
``library/model_util.py`` ``make_bucket_resolutions`` and ``library/train_util.py``
``BucketManager.select_bucket`` / ``round_to_steps``, ``BaseDataset.adjust_min_max_bucket_reso_by_steps``,
``trim_and_resize_if_required``. (During development the same functions, run from a kohya
checkout outside this repository, agreed with ``trainer.buckets`` on ~36,000 random image sizes
over 12 configurations; these literals are what that run and the hand derivations give.)
"""

import random

import pytest

from trainer.buckets import (
    assign_bucket,
    crop_geometry,
    kohya_crop_ltrb,
    make_buckets,
    select_bucket,
)
from trainer.plan import BucketOptions

SDXL = BucketOptions(resolution=(1024, 1024), enable_bucket=True, min_bucket_reso=256, max_bucket_reso=2048, bucket_reso_steps=64)

# make_bucket_resolutions((1024, 1024), 256, 2048, 64). Rule: area A = 1024*1024; the square
# floor(sqrt(A)/64)*64 = 1024; for w = 256, 320, ..., 2048: h = min(2048, floor((A // w) / 64) * 64),
# kept (both orientations) when h >= 256. E.g. w=256: A//256 = 4096 -> capped at 2048;
# w=576: A//576 = 1820 -> 1792; w=832: A//832 = 1260 -> 1216; w=1856: A//1856 = 564 -> 512.
SDXL_BUCKETS = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984),
    (512, 2048), (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408),
    (704, 1472), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512),
    (1984, 512), (2048, 256), (2048, 320), (2048, 384), (2048, 448), (2048, 512),
]  # fmt: skip


def test_sdxl_bucket_list():
    buckets = make_buckets(SDXL)
    assert buckets == SDXL_BUCKETS
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)


def test_default_max_1024_gives_square_only_up_to_1024():
    # max 1024: w=256 gives h=min(1024, 4096)=1024, ... w=1024 gives 1024 -> no side beyond 1024.
    opts = BucketOptions(resolution=(1024, 1024), enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024)
    buckets = make_buckets(opts)
    assert max(max(b) for b in buckets) == 1024
    assert (256, 1024) in buckets and (1024, 256) in buckets and (1024, 1024) in buckets


def test_min_max_rounded_to_steps_and_checked():
    # kohya adjust_min_max_bucket_reso_by_steps: min rounds down (250 -> 192), max up (2000 -> 2048).
    opts = BucketOptions(resolution=(1024, 1024), enable_bucket=True, min_bucket_reso=250, max_bucket_reso=2000)
    buckets = make_buckets(opts)
    assert min(min(b) for b in buckets) == 192
    assert max(max(b) for b in buckets) == 2048
    with pytest.raises(ValueError, match="max_bucket_reso"):
        make_buckets(BucketOptions(resolution=(1024, 1024), enable_bucket=True, max_bucket_reso=768))
    with pytest.raises(ValueError, match="min_bucket_reso"):
        make_buckets(BucketOptions(resolution=(512, 512), enable_bucket=True, min_bucket_reso=640, max_bucket_reso=1024))


@pytest.mark.parametrize(
    "size, bucket, resized, crop",
    [
        # 1:1 -> (1024, 1024), error 0; scale 1024/3000 on both sides.
        ((3000, 3000), (1024, 1024), (1024, 1024), (0, 0)),
        # 3:2 (ar 1.5): 1216/832 = 1.4615 (err .038) beats 1280/768 = 1.667 (err .167). The image is
        # wider than the bucket, so the height is matched: scale 832/1000 -> 1248 x 832, crop (1248-1216)//2 = 16.
        ((1500, 1000), (1216, 832), (1248, 832), (16, 0)),
        # 9:16 (ar .5625): 768/1344 = .5714 (err .0089) beats 768/1280 = .6 and 704/1408 = .5.
        # Narrower than the bucket -> width matched: 768 x round(1600*768/900 = 1365.3) = 1365, crop top 10.
        ((900, 1600), (768, 1344), (768, 1365), (0, 10)),
        # Extreme tall (ar .05): the narrowest bucket 256x2048 (ar .125); 256 x 5120, crop top 1536.
        ((100, 2000), (256, 2048), (256, 5120), (0, 1536)),
        # Extreme wide (ar 13.3): 2048x256; height matched: 4000*256/300 = 3413.3 -> 3413, crop left 682.
        ((4000, 300), (2048, 256), (3413, 256), (682, 0)),
        # Exact bucket size: used as is (kohya checks predefined_resos_set first).
        ((832, 1216), (832, 1216), (832, 1216), (0, 0)),
        # Small image: scaled up to cover (the bucket list does not depend on image size).
        ((300, 200), (1216, 832), (1248, 832), (16, 0)),
    ],
)
def test_assignment_and_centre_crop(size, bucket, resized, crop):
    buckets = make_buckets(SDXL)
    assert assign_bucket(size, SDXL, buckets) == bucket
    assert select_bucket(size, SDXL, buckets) == (bucket, resized)
    assert crop_geometry(size, bucket, False, None) == (resized, crop)


def test_tie_goes_to_first_bucket_in_list():
    # kohya: np.abs(errors).argmin() -> the first minimum. 80x64 has ar 1.25: |2 - 1.25| == |.5 - 1.25|.
    opts = BucketOptions(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=64, bucket_reso_steps=32)
    assert assign_bucket((80, 64), opts, [(64, 32), (32, 64)]) == (64, 32)
    assert assign_bucket((80, 64), opts, [(32, 64), (64, 32)]) == (32, 64)


def test_no_bucket_single_resolution():
    opts = BucketOptions(resolution=(512, 768), enable_bucket=False)
    buckets = make_buckets(opts)
    assert buckets == [(512, 768)]
    for size in [(100, 100), (4000, 300), (512, 768), (300, 4000)]:
        bucket, resized = select_bucket(size, opts, buckets)
        assert bucket == (512, 768)
        assert resized[0] >= 512 and resized[1] >= 768
    # 1000x1000 into 512x768: ar 1 > .667 -> height matched, 768x768, crop left (768-512)//2 = 128.
    assert select_bucket((1000, 1000), opts, buckets) == ((512, 768), (768, 768))
    assert crop_geometry((1000, 1000), (512, 768), False) == ((768, 768), (128, 0))


def test_bucket_no_upscale():
    opts = BucketOptions(
        resolution=(1024, 1024), enable_bucket=True, min_bucket_reso=256, max_bucket_reso=2048, bucket_reso_steps=64,
        bucket_no_upscale=True,
    )  # fmt: skip
    assert make_buckets(opts) == []
    # Area 480000 <= 1024^2: never resized; bucket = size floored to 64 -> (768, 576); centre crop (16, 12).
    assert select_bucket((800, 600), opts, []) == ((768, 576), (800, 600))
    assert crop_geometry((800, 600), (768, 576), False, None, (800, 600)) == ((800, 600), (16, 12))
    # 3000x2000 (ar 1.5) exceeds the area: rw = sqrt(A*1.5) = 1254.1, rh = 836.1.
    #   width first:  round_to_steps(1254.1) = 1216, height round_to_steps(1216/1.5 = 810.7) = 768 -> ar 1.583
    #   height first: round_to_steps(836.1) = 832,  width  round_to_steps(832*1.5 = 1248) = 1216 -> ar 1.4615
    # |1.4615 - 1.5| < |1.583 - 1.5| -> resized (int(832*1.5 + .5), 832) = (1248, 832), bucket (1216, 832).
    assert select_bucket((3000, 2000), opts, []) == ((1216, 832), (1248, 832))
    # Small image: kept at its size (no upscale), bucket floored: 300x200 -> (256, 192).
    assert select_bucket((300, 200), opts, []) == ((256, 192), (300, 200))
    with pytest.raises(ValueError):
        select_bucket((40, 500), opts, [])


def test_random_crop_draws_like_kohya():
    # kohya trim_and_resize_if_required: random.randint(0, excess) for the width, then the height,
    # each only when that side has excess.
    rng, ref = random.Random(7), random.Random(7)
    resized, (left, top) = crop_geometry((1500, 1000), (1216, 832), True, rng)
    assert resized == (1248, 832)
    assert left == ref.randint(0, 32) and top == 0
    assert rng.random() == ref.random()  # exactly one draw was made
    offsets = {crop_geometry((900, 1600), (768, 1344), True, random.Random(s))[1] for s in range(200)}
    assert all(l == 0 and 0 <= t <= 21 for l, t in offsets) and len(offsets) > 10


def test_kohya_crop_ltrb_is_letterbox_not_the_real_crop():
    # Documented deviation: kohya's get_crop_ltrb for 900x1600 in 768x1344 reports a left margin
    # (768 - 1344 * .5625) // 2 = 6 and top 0; the real crop cuts 10 rows from the top.
    left, top, _, _ = kohya_crop_ltrb((768, 1344), (900, 1600))
    assert (left, top) == (6, 0)
    assert crop_geometry((900, 1600), (768, 1344), False)[1] == (0, 10)
