"""The QR-LoRA folder(s): which ΔR files exist, what a tag's name refers to, their hashes.

Only ``.safetensors`` files are indexed (nothing is ever unpickled). A name resolves only
to an indexed file: the path relative to its folder without the extension
(``styles/watercolor``), the bare file name (``watercolor``) when it is unique, or the
``ss_output_name`` alias when that is unique. Names are looked up, never joined to a
folder, so ``<qrlora:../../x:1>`` cannot reach outside; ``syntax.check_name`` refuses it
with a message before the lookup.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

from . import core

EXTENSION = ".safetensors"
_OTHER_WEIGHTS = (".ckpt", ".pt", ".pth", ".bin", ".gguf")


class LookupFailed(LookupError):
    """A tag's name found no (unique) file. The message says what to do."""


@dataclass
class Entry:
    name: str  # relative path without extension, "/"-separated
    path: str
    folder: str
    mtime_ns: int
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    error: str = ""  # why the header could not be read (the card still shows)

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def alias(self) -> str:
        return self.metadata.get("ss_output_name") or self.stem

    @property
    def kind(self) -> str:
        return self.metadata.get("qrlora.kind", "")


class Library:
    def __init__(self, folders: Callable[[], Iterable[str]], excluded: Callable[[], Iterable[str]] = lambda: ()):
        self._folders = folders
        self._excluded = excluded
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._others: dict[str, str] = {}  # stem of a non-safetensors weight file -> its path (for hints)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._scanned = False

    # ----------------------------------------------------------------- scanning
    def folders(self) -> list[str]:
        out = []
        for f in self._folders():
            if f and os.path.abspath(f) not in out:
                out.append(os.path.abspath(f))
        return out

    def refresh(self) -> int:
        excluded = {os.path.realpath(p) for p in self._excluded() if p}
        entries, others = {}, {}
        for folder in self.folders():
            if not os.path.isdir(folder):
                continue
            for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                     and os.path.realpath(os.path.join(dirpath, d)) not in excluded)
                for fn in sorted(filenames):
                    path = os.path.join(dirpath, fn)
                    stem, ext = os.path.splitext(fn)
                    if ext.lower() in _OTHER_WEIGHTS:
                        others.setdefault(stem, path)
                    if ext.lower() != EXTENSION or fn.startswith("."):
                        continue
                    rel = os.path.relpath(path, folder)[: -len(ext)].replace(os.sep, "/")
                    entry = self._read(rel, path, folder)
                    if entry is not None and entry.kind != "basis" and rel not in entries:
                        entries[rel] = entry
        with self._lock:
            self._entries, self._others, self._scanned = entries, others, True
        return len(entries)

    def _read(self, name: str, path: str, folder: str) -> Entry | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        old = self._entries.get(name)
        if old is not None and old.path == path and (old.mtime_ns, old.size) == (st.st_mtime_ns, st.st_size):
            return old
        entry = Entry(name, path, folder, st.st_mtime_ns, st.st_size)
        try:
            _, entry.metadata, _ = core.checkpoint.read_header(path)
        except core.FileFormatError as e:
            entry.error = str(e)
        return entry

    def entries(self) -> list[Entry]:
        if not self._scanned:
            self.refresh()
        with self._lock:
            return list(self._entries.values())

    # ----------------------------------------------------------------- names
    def resolve(self, name: str) -> Entry:
        """The file a (checked) tag name refers to; LookupFailed with a hint otherwise."""
        found = self._lookup(name)
        if found is None:
            self.refresh()  # a file added since the last scan
            found = self._lookup(name)
        if found is None:
            stem = name.rsplit("/", 1)[-1]
            if stem in self._others:
                raise LookupFailed(
                    f"<qrlora:{name}>: found {os.path.basename(self._others[stem])}, but only .safetensors files are read"
                )
            raise LookupFailed(f"<qrlora:{name}>: no such file in {', '.join(self.folders()) or 'the QR-LoRA folder'}")
        return found

    def _lookup(self, name: str) -> Entry | None:
        with self._lock:
            entries = dict(self._entries)
        if name in entries:
            return entries[name]
        for key in ("stem", "alias"):
            matches = [e for e in entries.values() if getattr(e, key) == name]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                names = ", ".join(sorted(e.name for e in matches))
                raise LookupFailed(f"<qrlora:{name}>: several files are called {name} ({names}); write the relative path")
        return None

    # ----------------------------------------------------------------- hashes
    def shorthash(self, entry: Entry) -> str:
        """First 12 hex digits of the SHA-256 of the tensor data (kohya's addnet hash, which
        A1111's Lora uses for ``Lora hashes``): the file's own ``sshs_model_hash`` when it has
        one (every qrlora writer and the trainer store it), else computed once per file version."""
        stored = entry.metadata.get(core.checkpoint.MODEL_HASH_KEY, "").lower()
        if len(stored) == 64 and all(c in "0123456789abcdef" for c in stored):
            return stored[:12]
        key = (entry.path, entry.mtime_ns, entry.size)
        if key not in self._hashes:
            try:
                self._hashes[key] = core.checkpoint.tensor_data_sha256(entry.path)[:12]
            except (core.FileFormatError, OSError):
                self._hashes[key] = ""
        return self._hashes[key]

    def name_for_hash(self, short: str) -> str | None:
        short = (short or "").lower()
        if not short:
            return None
        for entry in self.entries():
            if self.shorthash(entry) == short:
                return entry.name
        return None


# ----------------------------------------------------------------- cards and the API
def trigger_words(metadata: dict[str, str], limit: int = 20) -> tuple[str, list[tuple[str, int]]]:
    """(``modelspec.trigger_phrase``, the most frequent training tags from ``ss_tag_frequency``)."""
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    counts: dict[str, int] = {}
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        freq = {}
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    try:
                        counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(n)
                    except (TypeError, ValueError):
                        continue
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return phrase, [kv for kv in ordered if kv[0]][:limit]


def shown_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """What the metadata viewer shows: ``ss_*``, ``modelspec.*`` and ``qrlora.*`` (the long
    layer list summarised)."""
    out = {}
    for k, v in metadata.items():
        if k == "qrlora.layers":
            try:
                out[k] = f"{len(json.loads(v))} layers"
            except ValueError:
                out[k] = "(malformed)"
        elif k.startswith(("ss_", "modelspec.", "qrlora.", "sshs_")):
            out[k] = v
    return out


def describe(entry: Entry) -> dict:
    """One file as ``GET /sdapi/v1/qrloras`` returns it."""
    m = entry.metadata
    phrase, tags = trigger_words(m)
    return {
        "name": entry.name,
        "alias": entry.alias,
        "path": entry.path,
        "arch": m.get("qrlora.arch", ""),
        "rank": m.get("qrlora.rank", ""),
        "alpha": m.get("qrlora.alpha", ""),
        "basis_id": m.get("qrlora.basis_id", ""),
        "portable": m.get("qrlora.portable") == "1",
        "trigger_phrase": phrase,
        "tags": [t for t, _ in tags],
        "error": entry.error,
        "metadata": shown_metadata(m),
    }
