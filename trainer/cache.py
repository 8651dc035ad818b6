"""Content-keyed caches for VAE latents and text-encoder outputs (safetensors, never pickle).

Why not kohya's scheme (``<stem>_<W>x<H>_sdxl.npz`` beside each image, validated by resolution
and flip only): an edited image or a different VAE silently reuses stale latents there
(bmaltais/kohya_ss #1629). Here a key is a sha256 over everything the cached value depends on,
so any change is a miss and the old entry is simply never read again:

- latents: sha256 of the image file's bytes, the bucket, the resize-and-crop geometry, the flip,
  the image pipeline version (``trainer.images.PIPELINE_VERSION``) and the caller's model
  identity string (e.g. the VAE weights' digest and dtype);
- text: the exact processed caption and the caller's model identity (text encoders, tokenizer,
  clip skip...).

Where: a folder the caller chooses (the trainer's default is ``<output_dir>/cache``), not beside
the images: image folders may be read-only or shared between runs with different VAEs, and
content keys let one folder serve many runs and datasets. Entries live at
``<folder>/<kind>/<key[:2]>/<key>.safetensors`` and are written to a temporary file in the same
folder and renamed into place, so a crash never leaves a truncated entry under a real key.
With ``folder=None`` the cache lives in memory for this process only.

Caching and augmentation (kohya's behaviour, enforced by ``trainer.data``): latents cannot be
cached with ``random_crop`` (the crop is part of the key, and a fresh one each epoch would
never hit); with ``flip_aug`` both the plain and the mirrored image are encoded and cached,
and each sample picks one at random. Text outputs are keyed by the processed caption, so a
cache is never wrong under shuffling or dropout, merely missed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .buckets import Size
from .images import PIPELINE_VERSION
from .plan import ImageItem

_file_digests: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) for this process."""
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        if memo in _file_digests:
            return _file_digests[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _digest_lock:
        _file_digests[memo] = digest
    return digest


def weights_identity(paths) -> str:
    """The content identity of model files (checkpoint, VAE, ...) that the caches' keys use:
    a digest of the SHA-256 of every byte of every file, in order. Not a sample: a merged LoRA
    or an edit of a single weight anywhere must be a miss, and one read of the files (which
    the trainer loads anyway, so they are in the page cache) costs seconds. Location-
    independent, so a copied or renamed model keeps its caches."""
    h = hashlib.sha256()
    for i, path in enumerate(paths):
        h.update(f"{i}:{file_sha256(path)};".encode())
    return h.hexdigest()[:16]


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class _Store:
    """Maps a hex key to a dict of tensors, in memory or as safetensors files."""

    def __init__(self, folder: str | None, kind: str, identity: str):
        self.identity = identity
        self.kind = kind
        self.folder = None if folder is None else os.path.join(folder, kind)
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        if self.folder is None:
            raise ValueError("in-memory cache has no paths")
        return os.path.join(self.folder, key[:2], key + ".safetensors")

    def get_tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            found = self._memory.get(key)
        else:
            found = None
            path = self.path(key)
            if os.path.exists(path):
                try:
                    with safe_open(path, framework="pt") as f:
                        found = {name: f.get_tensor(name) for name in f.keys()}
                except Exception:  # unreadable entry (disk trouble, foreign file): recompute it
                    found = None
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        # Own copies: safetensors refuses tensors that share storage (e.g. views of one output).
        tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        if self.folder is None:
            self._memory[key] = tensors
            return
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"kind": self.kind, "identity": self.identity})
            os.replace(tmp, path)  # atomic on POSIX and Windows (same folder)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def __contains__(self, key: str) -> bool:
        if self.folder is None:
            return key in self._memory
        return os.path.exists(self.path(key))


class LatentCache(_Store):
    """VAE latents, one tensor per (image content, geometry, flip, model identity)."""

    def __init__(self, folder: str | None, identity: str):
        super().__init__(folder, "latents", identity)

    def key_for(self, item: ImageItem, bucket: Size, crop: tuple[Size, Size], flip: bool) -> str:
        """``crop`` is what :func:`trainer.buckets.crop_geometry` returns:
        ``(resized_wh, crop_left_top)``."""
        resized, left_top = crop
        return _key(
            {
                "image_sha256": file_sha256(item.path),
                "bucket": list(bucket),
                "resized": list(resized),
                "crop_left_top": list(left_top),
                "flip": bool(flip),
                "pipeline": PIPELINE_VERSION,
                "identity": self.identity,
            }
        )

    def get(self, key: str) -> torch.Tensor | None:
        found = self.get_tensors(key)
        return None if found is None else found["latents"]

    def put(self, key: str, latents: torch.Tensor) -> None:
        self.put_tensors(key, {"latents": latents})


class TextCache(_Store):
    """Text-encoder outputs (a dict of named tensors), one entry per (caption, model identity)."""

    def __init__(self, folder: str | None, identity: str):
        super().__init__(folder, "text", identity)

    def key_for(self, caption: str) -> str:
        return _key({"caption": caption, "identity": self.identity})

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.get_tensors(key)

    def put(self, key: str, outputs: dict[str, torch.Tensor]) -> None:
        if not outputs:
            raise ValueError("nothing to cache")
        self.put_tensors(key, outputs)
