"""Epochs and batches, kohya-compatible: repeats, regularisation balancing, bucket batches.

kohya (``library/train_util.py``, v0.10.1): ``DreamBoothDataset.__init__`` (repeats, reg
balancing), ``BaseDataset.make_buckets`` / ``shuffle_buckets`` / ``__getitem__``, and
``train_network.py`` (a DataLoader with ``batch_size=1`` over whole bucket batches). What is
kept exactly: which images appear how often per epoch, which bucket each lands in, the batch
count ``sum over datasets and buckets of ceil(samples / batch_size)`` (= kohya's
``len(train_dataloader)``), and batches never mixing buckets or datasets. What differs: the
order. kohya draws it from the global ``random`` (seeded with seed + epoch) and then reshuffles
with the DataLoader's torch RNG; here it is a pure function of (seed, epoch) so a resumed run
sees exactly the batches it would have seen, and every per-sample draw (flip, random crop,
caption shuffle/dropout) is seeded from (seed, epoch, batch position, slot), so results do not
depend on worker count or on where a run was resumed.

Epochs are 1-based (kohya's ``current_epoch``, the number in ``{name}-{epoch:06d}`` files).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from . import buckets as bk
from . import images
from .cache import LatentCache, TextCache
from .captions import is_deterministic, process_caption
from .plan import DatasetPlan, ImageItem, balanced_repeats

Size = bk.Size


@dataclass(frozen=True)
class Placement:
    """One image's fixed geometry for the run."""

    item: ImageItem
    dataset: int  # index into plan.datasets
    size: Size  # source (w, h), EXIF orientation applied
    bucket: Size  # (w, h)
    resized: Size  # kohya's resize target before the crop (w, h)


def place_items(plan: DatasetPlan) -> tuple[list[Placement], list[int]]:
    """Every image with a sample count > 0 placed in its bucket, and those counts."""
    placements: list[Placement] = []
    counts: list[int] = []
    too_small: list[str] = []
    for d, spec in enumerate(plan.datasets):
        predefined = bk.make_buckets(spec.buckets)
        for item, count in zip(spec.items, balanced_repeats(spec.items)):
            if count == 0:
                continue
            size = tuple(item.size) if item.size is not None else images.image_size(item.path)
            try:
                bucket, resized = bk.select_bucket(size, spec.buckets, predefined)
            except bk.ImageTooSmall as e:
                too_small.append(f"{item.path}: {e}")
                continue
            placements.append(Placement(item, d, size, bucket, resized))
            counts.append(count)
    if too_small:  # every such image named at once, so they can all be fixed in one pass
        raise bk.ImageTooSmall(f"{len(too_small)} image(s) too small for their bucket: " + "; ".join(too_small))
    return placements, counts


def describe_buckets(plan: DatasetPlan) -> list[tuple[Size, int]]:
    """``[(bucket (w, h), samples per epoch)]`` over all datasets, repeats and reg balancing
    included (kohya's "number of images (including repeats)"), sorted by bucket. Reads image
    headers only."""
    return _bucket_totals(*place_items(plan))


def _bucket_totals(placements: list[Placement], counts: list[int]) -> list[tuple[Size, int]]:
    totals: dict[Size, int] = {}
    for p, count in zip(placements, counts):
        totals[p.bucket] = totals.get(p.bucket, 0) + count
    return sorted(totals.items())


def epoch_and_offset(batches_done: int, batches_per_epoch: int) -> tuple[int, int]:
    """Where to resume after ``batches_done`` batches: (1-based epoch, batch position in it)."""
    return batches_done // batches_per_epoch + 1, batches_done % batches_per_epoch


class TrainData(torch.utils.data.Dataset):
    """The training set as batches. Index with ``(epoch, position)``; each item is a list of
    samples from one bucket (pass it to :func:`collate`). :meth:`iter_epoch` and :meth:`loader`
    do this for you."""

    def __init__(
        self,
        plan: DatasetPlan,
        seed: int,
        latent_cache: LatentCache | None = None,
        text_cache: TextCache | None = None,
    ):
        self.plan = plan
        self.seed = int(seed)
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.placements, self.counts = place_items(plan)
        if latent_cache is not None:
            bad = sorted({p.item.path for p in self.placements if p.item.augment.random_crop})
            if bad:  # kohya: "random_crop cannot be used with caching latents"
                raise ValueError(f"random_crop cannot be used with cached latents: {bad[:3]}")
        # Per dataset, per bucket: placement indices, each repeated by its sample count.
        self._groups: list[tuple[int, list[int]]] = []  # (batch_size, members)
        for d, spec in enumerate(plan.datasets):
            if spec.batch_size < 1:
                raise ValueError(f"{spec.source or f'datasets[{d}]'}: batch_size must be >= 1")
            by_bucket: dict[Size, list[int]] = {}
            for i, p in enumerate(self.placements):
                if p.dataset == d:
                    by_bucket.setdefault(p.bucket, []).extend([i] * self.counts[i])
            for bucket in sorted(by_bucket):
                self._groups.append((spec.batch_size, by_bucket[bucket]))
        self._length = sum(math.ceil(len(m) / bs) for bs, m in self._groups)
        if self._length == 0:
            raise ValueError("the dataset has no training images (check image folders and num_repeats)")
        self._order_cache: tuple[int, list[tuple[int, ...]]] | None = None

    # ----- epoch composition -----
    def __len__(self) -> int:
        """Batches per epoch (kohya's ``len(train_dataloader)``)."""
        return self._length

    def steps_per_epoch(self, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> int:
        """Optimizer steps per epoch, as kohya computes it for ``max_train_epochs``:
        ``ceil(batches / num_processes / gradient_accumulation_steps)``."""
        return math.ceil(self._length / num_processes / gradient_accumulation_steps)

    def epoch_order(self, epoch: int) -> list[tuple[int, ...]]:
        """The epoch's batches as tuples of placement indices; a pure function of (seed, epoch)."""
        if epoch < 1:
            raise ValueError(f"epochs are 1-based, got {epoch}")
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        rng = random.Random(f"qrlora-order/{self.seed}/{epoch}")  # str seeds hash stably (sha512)
        batches: list[tuple[int, ...]] = []
        for bs, members in self._groups:
            members = list(members)
            rng.shuffle(members)  # in-bucket order, as kohya's BucketManager.shuffle
            batches.extend(tuple(members[i : i + bs]) for i in range(0, len(members), bs))
        rng.shuffle(batches)  # bucket order, as kohya's shuffle of buckets_indices
        self._order_cache = (epoch, batches)
        return batches

    @property
    def num_train_images(self) -> int:
        """kohya's ``ss_num_train_images``: non-reg images times their repeats."""
        return sum(it.repeats for spec in self.plan.datasets for it in spec.items if not it.is_reg and it.repeats > 0)

    @property
    def num_reg_images(self) -> int:
        """kohya's ``ss_num_reg_images``: reg images times their own repeats, before balancing."""
        return sum(it.repeats for spec in self.plan.datasets for it in spec.items if it.is_reg and it.repeats > 0)

    def bucket_counts(self) -> list[tuple[Size, int]]:
        """Like :func:`describe_buckets`, without reading the headers again."""
        return _bucket_totals(self.placements, self.counts)

    # ----- samples -----
    def __getitem__(self, key: tuple[int, int]) -> list[dict]:
        epoch, pos = key
        batch = self.epoch_order(epoch)[pos]
        return [self.sample(epoch, pos, slot, index) for slot, index in enumerate(batch)]

    def sample(self, epoch: int, pos: int, slot: int, index: int) -> dict:
        p = self.placements[index]
        item = p.item
        rng = random.Random(f"qrlora-sample/{self.seed}/{epoch}/{pos}/{slot}")
        flipped = item.augment.flip_aug and rng.random() < 0.5  # kohya: 50% per sample
        random_crop = item.augment.random_crop and self.latent_cache is None
        resized, (left, top) = bk.crop_geometry(p.size, p.bucket, random_crop, rng, p.resized)
        pixels = latents = None
        if self.latent_cache is not None:
            latents = self.latent_cache.get(self.latent_cache.key_for(item, p.bucket, (resized, (left, top)), flipped))
            if latents is None:
                raise RuntimeError(f"no cached latents for {item.path}; call TrainData.cache_latents() first")
        else:
            pixels = images.to_tensor(self._image(p, resized, (left, top), flipped))
        if flipped:
            # Coordinates in the mirrored resized image (diffusers flips before cropping).
            left = resized[0] - left - p.bucket[0]
        caption = process_caption(item.caption, item.captions, epoch, rng)
        text_outputs = None
        if self.text_cache is not None:
            text_outputs = self.text_cache.get(self.text_cache.key_for(caption))
        return {
            "pixels": pixels,  # float32 (3, H, W) in [-1, 1], or None when latents are cached
            "latents": latents,
            "caption": caption,
            "text_outputs": text_outputs,  # cached text-encoder outputs or None
            "is_reg": item.is_reg,
            "loss_weight": self.plan.prior_loss_weight if item.is_reg else 1.0,
            # SDXL micro-conditioning, (h, w) / (top, left) order as in kohya's
            # original_sizes_hw / crop_top_lefts / target_sizes_hw and diffusers' add_time_ids.
            "original_size": (p.size[1], p.size[0]),
            "crop_top_left": (top, left),
            "target_size": (p.bucket[1], p.bucket[0]),
            "flipped": flipped,
            "path": item.path,
        }

    @staticmethod
    def _image(p: Placement, resized: Size, left_top: Size, flipped: bool) -> Image.Image:
        img = images.resize_and_crop(images.load_rgb(p.item.path), resized, left_top, p.bucket)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else img

    # ----- iteration and resume -----
    def positions(self, start: int = 0, process_index: int = 0, num_processes: int = 1) -> list[int]:
        """Batch positions from ``start`` for one process: ``start + process_index`` every
        ``num_processes``. Each process gets the same count; short ones wrap to the epoch's
        remaining first batches, as accelerate's ``even_batches`` does, so DDP never waits on a
        missing step."""
        remaining = self._length - start
        if remaining <= 0:
            return []
        per_process = math.ceil(remaining / num_processes)
        return [start + (k * num_processes + process_index) % remaining for k in range(per_process)]

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Collated batches of ``epoch`` from batch position ``start`` (resume mid-epoch)."""
        for pos in range(start, self._length):
            yield collate(self[(epoch, pos)])

    def loader(
        self, epoch: int, start: int = 0, num_workers: int = 0, process_index: int = 0, num_processes: int = 1
    ) -> torch.utils.data.DataLoader:
        """A DataLoader over one epoch from ``start``; build a new one per epoch."""
        keys = [(epoch, pos) for pos in self.positions(start, process_index, num_processes)]
        return torch.utils.data.DataLoader(self, batch_size=None, sampler=keys, collate_fn=collate, num_workers=num_workers)

    # ----- caching -----
    def cache_latents(
        self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1, progress: Callable | None = None
    ) -> int:
        """Encode every latent the epochs can ask for that the cache lacks; returns how many.

        ``encode`` maps pixels (B, 3, H, W) in [-1, 1] to latents (B, C, h, w); it is called
        with same-bucket batches. With ``flip_aug`` the mirrored image is encoded too (kohya).
        """
        cache = self.latent_cache
        if cache is None:
            raise ValueError("TrainData has no latent cache")
        jobs: dict[str, tuple[Placement, tuple, bool]] = {}
        for p in self.placements:
            geometry = bk.crop_geometry(p.size, p.bucket, False, None, p.resized)
            for flip in (False, True) if p.item.augment.flip_aug else (False,):
                key = cache.key_for(p.item, p.bucket, geometry, flip)
                if key not in jobs and key not in cache:
                    jobs[key] = (p, geometry, flip)
        by_bucket: dict[Size, list[str]] = {}
        for key, (p, _, _) in jobs.items():
            by_bucket.setdefault(p.bucket, []).append(key)
        done = 0
        for bucket in sorted(by_bucket):
            keys = by_bucket[bucket]
            for i in range(0, len(keys), batch_size):
                chunk = keys[i : i + batch_size]
                pixels = torch.stack([images.to_tensor(self._image(jobs[k][0], *jobs[k][1], jobs[k][2])) for k in chunk])
                with torch.no_grad():
                    latents = encode(pixels)
                for k, latent in zip(chunk, latents):
                    if not torch.isfinite(latent).all():  # kohya raises on NaN latents too
                        raise RuntimeError(f"non-finite latents for {jobs[k][0].item.path}")
                    cache.put(k, latent)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(jobs))
        return done

    def fixed_captions(self) -> list[str] | None:
        """All captions the epochs can produce, when none is random (then text-encoder outputs
        can be cached up front, as kohya requires); None otherwise."""
        if not all(is_deterministic(p.item.captions) for p in self.placements):
            return None
        out: set[str] = set()
        unused = random.Random(0)  # deterministic options draw nothing
        for p in self.placements:
            out.add(process_caption(p.item.caption, p.item.captions, 1, unused))
            if p.item.captions.caption_dropout_every_n_epochs > 0:
                out.add("")
        return sorted(out)


def collate(samples: list[dict]) -> dict:
    """One bucket's samples as a batch dict (sizes as int64 (B, 2) tensors in (h, w) /
    (top, left) order, ready for SDXL's add_time_ids)."""

    def stack(name):
        values = [s[name] for s in samples]
        return None if any(v is None for v in values) else torch.stack(values)

    text = None
    if samples and all(s["text_outputs"] is not None for s in samples):
        text = {k: torch.stack([s["text_outputs"][k] for s in samples]) for k in samples[0]["text_outputs"]}
    return {
        "pixels": stack("pixels"),
        "latents": stack("latents"),
        "captions": [s["caption"] for s in samples],
        "text_outputs": text,
        "is_reg": torch.tensor([s["is_reg"] for s in samples], dtype=torch.bool),
        "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
        "original_sizes_hw": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "target_sizes_hw": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
        "flipped": [s["flipped"] for s in samples],
        "paths": [s["path"] for s in samples],
    }
