"""Reading safetensors files safely and lazily.

Only safetensors is ever read (never pickle). The header is parsed here so that a bad file
gets one clear message naming the file, and so that shapes are known without loading
tensors; tensors are then read one at a time through ``safetensors.safe_open``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import threading
from typing import Iterator

import torch

from .errors import OutputError, UserError

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


class SafetensorsShards:
    """The safetensors files of one diffusers component folder, read as one file: either
    ``*.safetensors.index.json`` (sharded: its ``weight_map`` names the files) or the folder's
    single ``*.safetensors``. Same reading interface as ``SafetensorsFile``."""

    def __init__(self, folder: str | os.PathLike):
        self.path = os.fspath(folder)
        self.files = [SafetensorsFile(p) for p in component_files(self.path)]
        self._file_of: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for key in f.keys:
                if key in self._file_of:
                    raise FileFormatError(f"{self.path}: tensor {key!r} is in both {self._file_of[key].path} and {f.path}")
                self._file_of[key] = f

    @property
    def keys(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, key: str) -> SafetensorsFile:
        if key not in self._file_of:
            raise FileFormatError(f"{self.path}: no tensor {key!r}")
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file_of(key).shape(key)

    def dtype_name(self, key: str) -> str:
        return self.file_of(key).dtype_name(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.shape(k) for k, f in self._file_of.items()}

    def tensor(self, key: str) -> torch.Tensor:
        return self.file_of(key).tensor(key)


def component_files(folder: str) -> list[str]:
    """The weight files of a diffusers component folder (``transformer/``, ``unet/``): the
    shards its index names, else its one ``.safetensors`` file. Pickled ``.bin`` weights are
    never read; a folder with only those is refused by name."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise FileFormatError(f"{folder}: cannot read the folder: {e.strerror or e}") from None
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        index = os.path.join(folder, indexes[0])
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise FileFormatError(f"{index}: not a safetensors index (no weight_map of tensor -> file)") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileFormatError(f"{index}: names {missing[0]}, which is not in the folder (an incomplete download?)")
        return [os.path.join(folder, s) for s in shards]
    weights = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) > 1 or len(weights) != 1:
        found = ", ".join(indexes + weights) or "no .safetensors file"
        raise FileFormatError(f"{folder}: expected one .safetensors file or one .safetensors.index.json, found {found}")
    return [os.path.join(folder, weights[0])]


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
    with open(path, "rb") as f:
        return _sha256_rest(f, chunk)


def tensor_data_sha256(path: str) -> str:
    """SHA-256 of everything after the header: kohya's ``sshs_model_hash`` (the "addnet" hash
    A1111's Lora shows, first 12 hex digits). Metadata edits do not change it."""
    _, _, offset = read_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return _sha256_rest(f)


def _sha256_rest(f, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


# The dtype names of the tools' ``--dtype`` options and the trainer's save precision.
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

MODEL_HASH_KEY = "sshs_model_hash"
_umask_lock = threading.Lock()


def _umask() -> int:
    with _umask_lock:  # the only portable way to read it is to set it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; when the block ends without an exception
    the file is flushed to disk, given the permissions a new file gets (``0o666 & ~umask``,
    not the temporary file's 0600: a WebUI running as another user must read it) and renamed
    into place, so a crash never leaves a half-written file under the real name. Any
    ``OSError`` becomes an ``OutputError`` naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable where the platform allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` into ``path`` through ``atomic_output`` (JSON sidecars, indexes, images)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` of the file these tensors make.
    kohya defines them on the file with only its ``ss_*`` metadata (so user edits do not change
    them): the SHA-256 of everything after the header (what ``tensor_data_sha256`` reads back
    from any copy of the file), and the first 8 hex digits of the SHA-256 of bytes
    0x100000..0x110000 (the old additional-networks hash)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={k: v for k, v in metadata.items() if k.startswith("ss_")} or None)
    (n,) = struct.unpack("<Q", data[:8])
    view = memoryview(data)
    return {MODEL_HASH_KEY: hashlib.sha256(view[8 + n :]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(view[0x100000:0x110000]).hexdigest()[:8]}


def save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None,
                model_hash: bool = False) -> None:
    """Write a safetensors file through ``atomic_output``. With ``model_hash`` the metadata
    also carries ``kohya_hashes``, so a WebUI shows the file's hash without reading it all."""
    from safetensors.torch import save

    metadata = dict(metadata or {})
    if model_hash:  # hashes carried over from an input file describe that file, not this one
        metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
        metadata.update(kohya_hashes(tensors, metadata))
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata or None)
    write_bytes_atomic(path, canonical_header(data))


def canonical_header(data: bytes) -> bytes:
    """safetensors bytes with the metadata in sorted key order (safetensors writes it in hash-map
    order, which changes from process to process), so the same tensors and metadata always give
    the same file. Same header length, so hashes of fixed byte ranges are unchanged."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # never: only the order changed; keep the file as written rather than fail
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]
