"""Image I/O for training: header-only sizes, loading, resize-and-crop, tensors.

Differences from kohya (``library/train_util.py`` ``load_image``, ``get_image_size`` and
``library/utils.py`` ``resize_image``), on purpose:
- EXIF orientation is applied (kohya ignores it, so a phone photo trains sideways); sizes read
  from headers are swapped to match.
- Transparency is composited on white (kohya's ``convert("RGB")`` keeps whatever colour the
  transparent pixels happen to store, often black).
- Resampling follows kohya's default choice, without OpenCV: when neither side grows, kohya
  uses ``cv2.INTER_AREA``; we use PIL's BOX filter, the same area average. When a side grows,
  kohya uses PIL LANCZOS, and so do we.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch
from PIL import Image, ImageOps

from .buckets import Size

_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
PIPELINE_VERSION = "img-v1:exif,white-alpha,box-down,lanczos-up,center-or-random-crop"
# ^ Part of every latent cache key: change it whenever pixels would come out differently.


def image_size(path: str) -> Size:
    """(width, height) after EXIF orientation, read from the header without decoding pixels."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(_ORIENTATION, 1)
        except Exception:  # malformed EXIF: treat as upright, as most viewers do
            orientation = 1
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def load_rgb(path: str) -> Image.Image:
    """Decoded, EXIF-transposed RGB image; transparency composited on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if "transparency" in im.info:  # palette or colour-key transparency (GIF, some PNGs)
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
            canvas.alpha_composite(im)
            return canvas.convert("RGB")
        return im.convert("RGB")  # also forces the lazy decode before the file closes


def resize_and_crop(img: Image.Image, resized: Size, crop_left_top: Size, bucket: Size) -> Image.Image:
    """Resize to ``resized`` (w, h) then keep the ``bucket``-sized window at ``crop_left_top``."""
    if img.size != tuple(resized):
        grows = resized[0] > img.size[0] or resized[1] > img.size[1]
        resample = Image.Resampling.LANCZOS if grows else Image.Resampling.BOX
        img = img.resize(tuple(resized), resample=resample)
    left, top = crop_left_top
    if (left, top) != (0, 0) or img.size != tuple(bucket):
        img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """float32 CHW in [-1, 1] (kohya's ToTensor + Normalize(0.5, 0.5))."""
    w, h = img.size
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return data.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------- validation before training
def decode_problem(path: str) -> str | None:
    """Why training could not use ``path`` (unreadable, empty, not an image, truncated or
    damaged), or None. Decodes the whole image exactly as training will (:func:`load_rgb`)."""
    try:
        if os.path.getsize(path) == 0:
            return "is empty (0 bytes)"
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        image_size(path)
        load_rgb(path)
    except Image.UnidentifiedImageError:
        return "is not an image file PIL can read"
    except Exception as e:  # noqa: BLE001  PIL's decoders raise many types on damaged data
        return f"cannot be decoded, the file is truncated or damaged ({type(e).__name__}: {e})"
    return None


class ImageChecks:
    """Images already decoded without a problem, by (absolute path, size, mtime), in a JSON file,
    so that re-running a large dataset does not decode every image again. Only a speed-up:
    anything unreadable in the file means "not checked yet"."""

    VERSION = 1

    def __init__(self, path: str | None):
        self.path = path
        self.good: dict[str, list[int]] = {}
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("version") == self.VERSION and data.get("pipeline") == PIPELINE_VERSION:
                    self.good = {k: list(v) for k, v in data["good"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.good = {}

    @staticmethod
    def stamp(path: str) -> list[int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns]

    def known_good(self, path: str) -> bool:
        stamp = self.stamp(path)
        return stamp is not None and self.good.get(os.path.abspath(path)) == stamp

    def save(self) -> None:
        """Best effort: a cache that cannot be written costs only time."""
        if not self.path:
            return
        from qrlora.checkpoint import write_bytes_atomic
        from qrlora.errors import UserError

        data = {"version": self.VERSION, "pipeline": PIPELINE_VERSION, "good": self.good}
        try:
            write_bytes_atomic(self.path, json.dumps(data, sort_keys=True).encode("utf-8"))
        except (OSError, UserError):
            pass


def find_bad_images(paths: Iterable[str], cache_file: str | None = None, workers: int | None = None) -> list[tuple[str, str]]:
    """``[(path, problem)]`` for every image that cannot be trained on, in the order given; each
    image is decoded once (in parallel: PIL decodes outside the GIL) unless ``cache_file``
    says it was decoded before at this size and modification time."""
    checks = ImageChecks(cache_file)
    unique = list(dict.fromkeys(paths))
    todo = [p for p in unique if not checks.known_good(p)]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        problems = dict(zip(todo, pool.map(decode_problem, todo)))
    bad = [(p, problems[p]) for p in unique if problems.get(p)]
    for p in todo:
        stamp = checks.stamp(p)
        if problems[p] is None and stamp is not None:
            checks.good[os.path.abspath(p)] = stamp
    if todo:
        checks.save()
    return bad
