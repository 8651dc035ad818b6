"""Reading safetensors files safely and lazily.

Only safetensors is ever read (never pickle). The header is parsed here so that a bad file
gets one clear message naming the file, and so that shapes are known without loading
tensors; tensors are then read one at a time through ``safetensors.safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Iterator

import torch

from .errors import UserError

_MAX_HEADER = 100 * 1024 * 1024

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class FileFormatError(UserError):
    """A file is not what it claims to be. The message names the file and the problem."""


class SafetensorsFile:
    """A safetensors file: header parsed and checked up front, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.header, self.metadata, self.data_offset = read_header(self.path)
        self._handle = None

    @property
    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype_name(self, key: str) -> str:
        return self.header[key]["dtype"]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.header:
            raise FileFormatError(f"{self.path}: no tensor {key!r}")
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(self.path, framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.header:
            yield key, self.tensor(key)

    def close(self) -> None:
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_header(path: str) -> tuple[dict, dict[str, str], int]:
    """(tensor header, metadata, offset of tensor data); raises FileFormatError."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FileFormatError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > _MAX_HEADER or 8 + n > size:
                raise FileFormatError(
                    f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file;"
                    " a pickled .ckpt/.pt, or a truncated download?)"
                )
            raw = f.read(n)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileFormatError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(f"{path}: safetensors metadata must map strings to strings")
    data_len = size - 8 - n
    for key, info in header.items():
        try:
            start, stop = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (TypeError, KeyError, ValueError):
            raise FileFormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if dtype not in _ITEMSIZE:
            raise FileFormatError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        count = 1
        for d in shape:
            count *= int(d)
        if stop - start != count * _ITEMSIZE[dtype] or stop > data_len or start < 0:
            raise FileFormatError(
                f"{path}: tensor {key!r} needs bytes {start}..{stop} of {data_len}: the file is truncated or corrupt"
            )
    return header, metadata, 8 + n


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    """Full-file SHA-256, the hash A1111 and Forge show (first 10 hex digits) for checkpoints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def tensor_data_sha256(path: str) -> str:
    """SHA-256 of everything after the header: kohya's ``sshs_model_hash`` / addnet hash."""
    _, _, offset = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            block = f.read(1 << 24)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file to a temporary name beside ``path``, then rename it into place,
    so a crash never leaves a half-written file under the real name."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
