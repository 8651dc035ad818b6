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
