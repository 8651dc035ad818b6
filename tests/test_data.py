"""Epoch composition, batching, resume and image loading (kohya-compatible counts).

kohya-ss/sd-scripts v0.10.1 (48d368fa) ``library/train_util.py``: ``DreamBoothDataset.__init__``
(reg balancing), ``BaseDataset.make_buckets`` (batches per bucket), ``__getitem__`` (flip,
SDXL sizes); ``train_network.py`` (``len(train_dataloader)``, steps per epoch).
"""

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.cache import LatentCache, TextCache
from trainer.data import TrainData, collate, describe_buckets, epoch_and_offset
from trainer.plan import (AugmentOptions, BucketOptions, CaptionOptions, DatasetPlan, DatasetSpec, ImageItem,
                          balanced_repeats)

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def halves(size, left, right, mode="RGB"):
    """An image whose left half is one colour and right half another."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    (root / "train").mkdir()
    (root / "reg").mkdir()
    halves((64, 64), RED, BLUE).save(root / "train/a.png")
    halves((96, 64), RED, BLUE).save(root / "train/b.jpg", quality=95)
    # PNG with alpha: transparent black top half, opaque green bottom half.
    rgba = Image.new("RGBA", (48, 80), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (48, 40), GREEN + (255,)), (0, 40))
    rgba.save(root / "train/c.png")
    # JPEG stored 80x48 (red left, blue right) with EXIF orientation 6 (rotate 90 CW to view):
    # viewed it is 48x80 with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    halves((80, 48), RED, BLUE).save(root / "train/d.jpg", quality=95, exif=exif)
    Image.new("RGB", (64, 64), GREEN).save(root / "reg/r1.png")
    Image.new("RGB", (64, 96), GREEN).save(root / "reg/r2.png")
    return root


SMALL = BucketOptions(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
# make_buckets(SMALL): (32,96) (32,112) (32,128) (48,80) (64,64) (80,48) (96,32) (112,32) (128,32).


def make_plan(folder, batch_size=2, captions=CaptionOptions(), augment=AugmentOptions()):
    def item(name, repeats, is_reg=False, caption=None):
        return ImageItem(
            path=str(folder / name), caption=caption or f"sks, {name}, tag a, tag b", repeats=repeats,
            is_reg=is_reg, captions=captions, augment=augment,
        )  # fmt: skip

    train = [item(f"train/{n}", 3) for n in ("a.png", "b.jpg", "c.png", "d.jpg")]
    reg = [item("reg/r1.png", 1, True, "dog"), item("reg/r2.png", 1, True, "dog")]
    other = DatasetSpec(
        kind="dreambooth", batch_size=3, buckets=BucketOptions(resolution=(32, 32)),
        items=[item("train/a.png", 2), item("train/b.jpg", 1)],
    )  # fmt: skip
    return DatasetPlan(
        [DatasetSpec(kind="dreambooth", batch_size=batch_size, buckets=SMALL, items=train + reg), other],
        prior_loss_weight=0.5,
    )


def test_balanced_repeats_kohya_rule():
    # kohya DreamBoothDataset: reg items registered with their repeats until n >= train total;
    # if short, further passes add 1 per reg item, stopping as soon as n >= train total.
    def items(train, reg):
        return [ImageItem("t", "", r, False) for r in train] + [ImageItem("r", "", r, True) for r in reg]

    # T = 3*5 = 15; 4 reg x1: pass 1 -> 4, passes 2, 3 -> 12, pass 4 stops after 3 more -> [4, 4, 4, 3].
    assert balanced_repeats(items([5, 5, 5], [1, 1, 1, 1])) == [5, 5, 5, 4, 4, 4, 3]
    # T = 10; 5 reg x3: the first pass overshoots at the 4th (3, 6, 9, 12) -> 12 reg samples, 5th unused.
    assert balanced_repeats(items([5, 5], [3, 3, 3, 3, 3])) == [5, 5, 3, 3, 3, 3, 0]
    # More reg than needed: T = 2 -> [1, 1, 0].
    assert balanced_repeats(items([2], [1, 1, 1])) == [2, 1, 1, 0]
    # No train images -> no reg; repeats < 1 -> ignored (kohya skips such subsets).
    assert balanced_repeats(items([], [2])) == [0]
    assert balanced_repeats(items([0, 2], [1])) == [0, 2, 2]


def test_steps_per_epoch_equals_kohya(folder):
    data = TrainData(make_plan(folder, batch_size=2), seed=1)
    # Dataset 0 (bs 2): train 4 images x 3 = 12; reg 2 x 1 -> passes add 1 each until 12 -> 6 + 6.
    # Buckets (kohya select_bucket): a 64x64 -> (64,64); b 96x64 (ar 1.5) -> (80,48);
    # c 48x80 -> (48,80) exactly; d viewed 48x80 (EXIF) -> (48,80); r1 -> (64,64); r2 64x96 (ar .667) -> (48,80).
    # Samples per bucket: (64,64) 3 + 6 = 9; (80,48) 3; (48,80) 3 + 3 + 6 = 12.
    # kohya: batches = sum ceil(count / batch_size) = 5 + 2 + 6 = 13.
    # Dataset 1 (bs 3, no bucketing): a x2 + b x1 = 3 samples in (32,32) -> 1 batch.
    # len(train_dataloader) = 13 + 1 = 14; steps/epoch = ceil(14 / processes / grad_accum).
    assert len(data) == 14
    assert data.steps_per_epoch() == 14
    assert data.steps_per_epoch(gradient_accumulation_steps=4) == 4
    assert data.steps_per_epoch(num_processes=2, gradient_accumulation_steps=2) == 4
    assert (data.num_train_images, data.num_reg_images) == (12 + 3, 2)  # kohya's ss_num_*_images
    assert describe_buckets(data.plan) == [((32, 32), 3), ((48, 80), 12), ((64, 64), 9), ((80, 48), 3)]
    assert data.bucket_counts() == describe_buckets(data.plan)
    assert len(TrainData(make_plan(folder, batch_size=4), seed=1)) == 3 + 1 + 3 + 1


def test_epoch_order_reproducible_and_complete(folder):
    data = TrainData(make_plan(folder), seed=1)
    e1 = data.epoch_order(1)
    assert TrainData(make_plan(folder), seed=1).epoch_order(1) == e1  # same (seed, epoch) -> same
    assert data.epoch_order(2) != e1
    assert TrainData(make_plan(folder), seed=2).epoch_order(1) != e1
    for epoch in (1, 2, 3):
        order = data.epoch_order(epoch)
        assert len(order) == len(data)
        seen = Counter(i for batch in order for i in batch)
        assert [seen[i] for i in range(len(data.placements))] == data.counts
        for batch in order:  # one bucket and one dataset per batch
            assert len({(data.placements[i].dataset, data.placements[i].bucket) for i in batch}) == 1
    with pytest.raises(ValueError):
        data.epoch_order(0)


def test_resume_mid_epoch_yields_the_remaining_batches(folder):
    plan = make_plan(folder, captions=CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3),
                     augment=AugmentOptions(flip_aug=True, random_crop=True))  # fmt: skip
    full = list(TrainData(plan, seed=5).iter_epoch(2))
    resumed = list(TrainData(plan, seed=5).iter_epoch(2, start=6))  # a fresh process
    assert len(resumed) == len(full) - 6
    for a, b in zip(full[6:], resumed):
        assert a["paths"] == b["paths"] and a["captions"] == b["captions"] and a["flipped"] == b["flipped"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["crop_top_lefts"], b["crop_top_lefts"])
    assert epoch_and_offset(14 + 6, 14) == (2, 6)


def test_loader_workers_and_sharding(folder):
    data = TrainData(make_plan(folder), seed=3)
    ref = list(data.iter_epoch(1, start=2))
    got = list(data.loader(1, start=2, num_workers=2))
    assert [b["paths"] for b in got] == [b["paths"] for b in ref]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(got, ref))
    # Two processes: equal counts, together every remaining position (wrapping pads the short one).
    p0, p1 = data.positions(1, 0, 2), data.positions(1, 1, 2)
    assert len(p0) == len(p1) == math.ceil(13 / 2)
    assert set(p0) | set(p1) == set(range(1, 14))


def test_samples_pixels_sizes_and_loss_weights(folder):
    data = TrainData(make_plan(folder), seed=0)
    by_path = {}
    for batch in data.iter_epoch(1):
        b, _, h, w = batch["pixels"].shape
        assert batch["pixels"].dtype == torch.float32 and batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert batch["target_sizes_hw"].tolist() == [[h, w]] * b
        assert batch["loss_weights"].tolist() == [0.5 if r else 1.0 for r in batch["is_reg"].tolist()]
        for i, path in enumerate(batch["paths"]):
            by_path.setdefault((path, (h, w)), (batch["pixels"][i], batch["original_sizes_hw"][i].tolist(),
                                               batch["crop_top_lefts"][i].tolist()))  # fmt: skip
    path = lambda n: str(folder / n)  # noqa: E731
    # b.jpg 96x64 -> bucket (80,48) (h 48, w 80): resized 80x53, centre crop top (53-48)//2 = 2.
    _, orig, crop = by_path[(path("train/b.jpg"), (48, 80))]
    assert orig == [64, 96] and crop == [2, 0]
    # reg r2 64x96 -> (48,80): height matched (80/96), width 53, crop left 2.
    assert by_path[(path("reg/r2.png"), (80, 48))][2] == [0, 2]
    # Alpha composited on white: top half white, bottom green.
    px, orig, _ = by_path[(path("train/c.png"), (80, 48))]
    assert orig == [80, 48]
    assert torch.allclose(px[:, 5, 24], torch.ones(3)) and torch.allclose(px[:, 70, 24], torch.tensor([-1.0, 1.0, -1.0]))
    # EXIF orientation applied: viewed 48x80 (h 80, w 48) with red on top, blue below.
    px, orig, _ = by_path[(path("train/d.jpg"), (80, 48))]
    assert orig == [80, 48]
    assert px[0, 10, 24] > 0.8 and px[2, 10, 24] < -0.8 and px[2, 70, 24] > 0.8 and px[0, 70, 24] < -0.8
    # Dataset 1 has no bucketing: a.png 64x64 -> 32x32.
    assert (path("train/a.png"), (32, 32)) in by_path


def test_flip_and_random_crop(folder):
    aug = AugmentOptions(flip_aug=True, random_crop=True)
    data = TrainData(make_plan(folder, augment=aug), seed=0)
    flips, crops = Counter(), set()
    for epoch in (1, 2, 3):
        for batch in data.iter_epoch(epoch):
            for i, path in enumerate(batch["paths"]):
                if path.endswith("a.png") and batch["pixels"].shape[-1] == 64:
                    # a.png: red left, blue right; flipped -> blue left.
                    px = batch["pixels"][i]
                    assert (px[2, 32, 2] > 0.8) == batch["flipped"][i] and (px[0, 32, 2] > 0.8) != batch["flipped"][i]
                    flips[batch["flipped"][i]] += 1
                if path.endswith("b.jpg") and batch["pixels"].shape[-1] == 80:
                    top, left = batch["crop_top_lefts"][i].tolist()
                    assert 0 <= top <= 5 and left == 0  # 80x53 in 80x48: 5 spare rows
                    crops.add(top)
    assert flips[True] > 0 and flips[False] > 0
    assert len(crops) > 1


def test_flipped_crop_left_is_mirrored(folder):
    # r2 64x96 -> resized 53x80, crop left 2 in bucket 48x80; mirrored: 53 - 2 - 48 = 3.
    plan = make_plan(folder, augment=AugmentOptions(flip_aug=True))
    data = TrainData(plan, seed=0)
    seen = set()
    for epoch in (1, 2, 3):
        for batch in data.iter_epoch(epoch):
            for i, path in enumerate(batch["paths"]):
                if path.endswith("r2.png"):
                    seen.add((batch["flipped"][i], tuple(batch["crop_top_lefts"][i].tolist())))
    assert seen == {(False, (0, 2)), (True, (0, 3))}


def fake_vae(pixels):
    return torch.cat([F.avg_pool2d(pixels, 8), F.max_pool2d(pixels, 8)[:, :1]], dim=1)


def test_cached_latents_replace_pixels(folder, tmp_path):
    plan = make_plan(folder, augment=AugmentOptions(flip_aug=True))
    cache = LatentCache(str(tmp_path / "cache"), identity="fake-vae")
    data = TrainData(plan, seed=4, latent_cache=cache)
    # Unique images x 2 flips: dataset 0 has 6 images; dataset 1 a.png/b.jpg in a different bucket.
    assert data.cache_latents(fake_vae, batch_size=4) == (6 + 2) * 2
    assert TrainData(plan, seed=4, latent_cache=cache).cache_latents(fake_vae) == 0  # all hits now
    plain = TrainData(plan, seed=4)
    for pos, batch in enumerate(data.iter_epoch(1)):
        assert batch["pixels"] is None
        ref = collate(plain[(1, pos)])
        assert batch["flipped"] == ref["flipped"] and torch.equal(batch["crop_top_lefts"], ref["crop_top_lefts"])
        assert torch.allclose(batch["latents"], fake_vae(ref["pixels"]), atol=1e-6)
    with pytest.raises(ValueError, match="random_crop"):
        TrainData(make_plan(folder, augment=AugmentOptions(random_crop=True)), seed=0, latent_cache=cache)
    with pytest.raises(RuntimeError, match="cache_latents"):
        TrainData(plan, seed=4, latent_cache=LatentCache(None, "other"))[(1, 0)]


def test_text_cache_and_fixed_captions(folder):
    data = TrainData(make_plan(folder, captions=CaptionOptions(caption_prefix="photo,")), seed=0)
    captions = data.fixed_captions()
    assert "photo, sks, train/a.png, tag a, tag b" in captions and "photo, dog" in captions
    cache = TextCache(None, "te")
    for c in captions:
        cache.put(cache.key_for(c), {"hidden": torch.full((2, 3), float(len(c))), "pooled": torch.zeros(4)})
    data = TrainData(make_plan(folder, captions=CaptionOptions(caption_prefix="photo,")), seed=0, text_cache=cache)
    batch = next(data.iter_epoch(1))
    assert batch["text_outputs"]["hidden"].shape == (len(batch["captions"]), 2, 3)
    assert batch["text_outputs"]["hidden"][0, 0, 0] == len(batch["captions"][0])
    assert TrainData(make_plan(folder, captions=CaptionOptions(shuffle_caption=True)), seed=0).fixed_captions() is None


def test_size_from_metadata_and_empty_plan(folder):
    plan = make_plan(folder)
    spec = plan.datasets[0]
    spec.items[0] = replace(spec.items[0], size=(200, 100))  # metadata size wins (kohya uses it too)
    data = TrainData(plan, seed=0)
    # ar 2: nearest is 80/48 = 1.667 (err .33; 96/32 = 3 has err 1).
    assert data.placements[0].size == (200, 100) and data.placements[0].bucket == (80, 48)
    with pytest.raises(ValueError, match="no training images"):
        TrainData(DatasetPlan([DatasetSpec("dreambooth", 1, SMALL, [])]), seed=0)


def test_palette_transparency_on_white(tmp_path):
    from trainer.images import image_size, load_rgb

    img = Image.new("P", (8, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (4, 0, 8, 4))  # right half: palette entry 1 (green); left: entry 0, transparent
    img.save(tmp_path / "p.png", transparency=0)
    rgb = load_rgb(str(tmp_path / "p.png"))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((6, 2)) == GREEN
    assert image_size(str(tmp_path / "p.png")) == (8, 4)
