"""CLIP tokenizers without a hub.

Every CLIP text encoder SD/SDXL/FLUX use (CLIP-L, OpenCLIP bigG) tokenizes with the same
byte-level BPE: 49,408 ids (256 byte symbols, the same 256 with the end-of-word mark
``</w>``, 48,894 merges, ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407), 77 positions.
The hub's ``vocab.json``/``merges.txt`` are a pure function of CLIP's merges list, which the
``open-clip-torch`` package ships as ``bpe_simple_vocab_16e6.txt.gz``; we derive the two
files from it exactly as CLIP's own ``SimpleTokenizer`` builds its table, cache them, and
load them with ``transformers.CLIPTokenizer``.

Where to get a tokenizer, in order (``resolve_clip_tokenizers``); the first that applies is
the choice, never "whatever a cache happens to hold":
1. a folder the user names (``model.tokenizer``): ``tokenizer/`` + ``tokenizer_2/`` (a
   diffusers layout) or one CLIP tokenizer folder used for every encoder;
2. the diffusers model folder's own ``tokenizer``/``tokenizer_2``;
3. for the built-in tiny models: always their own tiny CLIP-style BPE (byte symbols + a few
   hundred merges learnt from a fixed word list), so a tiny run gives the same result whether
   or not open_clip is installed or its vocabulary was ever cached;
4. the full vocabulary derived from open_clip's BPE file (found without importing open_clip,
   whose import needs torchvision);
5. otherwise an error saying how to provide one.

Derived folders are rebuilt whenever their cached files differ from what the derivation gives
(a full CLIP folder without open_clip installed is checked against CLIP's known digest), and
the choice carries the SHA-256 of the files that define it, which the trainer prints and
records in the file it writes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from qrlora.errors import UserError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = 48894  # CLIP keeps merges lines 1 .. 49152-256-2 of its file
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_FULL_NAME = "clip-bpe-16e6"
_TINY_NAME = "tiny-clip-bpe-v1"


# The files that decide what a tokenizer folder does (the digest covers those present).
DEFINING_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json")
# folder_digest of the folder full_clip_tokenizer_folder writes (CLIP's 49,408 tokens): a cached
# copy is trusted without open_clip only if it still has this digest.
CLIP_FOLDER_SHA256 = "dd5613245f7d03132dcf9fdd8001f8511c659257a4ffd5f44b18773765898a59"


class TokenizerNotFound(UserError):
    pass


@dataclass(frozen=True)
class TokenizerChoice:
    """Which tokenizer a run uses: how it was chosen, where it came from and the digest of its
    defining files."""

    kind: str  # "model.tokenizer", "model folder", "built-in tiny BPE", "CLIP BPE from open_clip"
    source: str  # the folder named, or a description
    folders: tuple[str, ...]
    sha256: str

    def __str__(self) -> str:
        return f"{self.source} (sha256 {self.sha256[:16]})"


def folder_digest(folders: Sequence[str]) -> str:
    """SHA-256 over the defining files of each folder, by name and content (not location)."""
    h = hashlib.sha256()
    for i, folder in enumerate(folders):
        for name in DEFINING_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(f"{i}/{name}:".encode() + f.read() + b";")
    return h.hexdigest()


# ----------------------------------------------------------------- the CLIP vocabulary
def byte_symbols() -> dict[int, str]:
    """Byte value -> its printable stand-in, in CLIP's (GPT-2's) vocabulary order.

    Bytes that are printable, non-space Latin-1 characters stand for themselves and come
    first, in byte order; the other 68 bytes get the code points 256, 257, ... in byte order.
    BPE then never sees whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + i)
    return table


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id table: byte symbols, the same with ``</w>``, one token per merge, BOS, EOS.

    A merge whose result is already a token (possible in merges learnt by ``learn_merges``,
    not in CLIP's) adds no new id.
    """
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def read_clip_bpe(path: str) -> list[tuple[str, str]]:
    """The merges CLIP uses from its gzipped merges list (the first line is a header)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not CLIP's BPE merges list")
    return merges  # type: ignore[return-value]


def open_clip_bpe_path() -> str | None:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` if that package's files are installed.

    Found through the import system's spec, never by importing open_clip (which pulls in
    torchvision and, on some versions, network code)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, _BPE_FILE)
        if os.path.isfile(path):
            return path
    return None


# ----------------------------------------------------------------- a tiny BPE, learnt here
# Caption-like words; enough merges that most of them become single tokens.
_TINY_WORDS = (
    "a an the of and with in on at by to from for is photo picture image painting drawing sketch "
    "illustration portrait watercolor oil style art artwork dog cat puppy kitten bird horse fish "
    "person man woman girl boy child face eyes hair smile sitting standing running lying grass "
    "field forest tree trees flower flowers garden park beach sea ocean water river lake sky cloud "
    "clouds sun sunset night moon city street house room table chair window red blue green yellow "
    "black white brown orange pink purple gray golden bright dark light soft warm cold small big "
    "large tiny cute happy old young beautiful detailed high quality best worst low blurry sharp "
    "close up view background foreground sks token style of by artist masterpiece realistic"
).split()


def learn_merges(words: Sequence[str], count: int) -> list[tuple[str, str]]:
    """Plain BPE learning: repeatedly merge the most frequent adjacent pair (ties: the
    lexicographically smallest pair), words split into byte symbols with ``</w>`` on the last."""
    symbols = byte_symbols()
    table = Counter()
    for word in words:
        syms = [symbols[b] for b in word.encode("utf-8")]
        syms[-1] += "</w>"
        table[tuple(syms)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, freq in table.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for word, freq in table.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        table = merged
    return merges


# ----------------------------------------------------------------- files and loading
def _tokenizer_files(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> dict[str, bytes]:
    """The files of a CLIP tokenizer folder, exactly as written (so a cached copy can be compared)."""
    config = {"model_max_length": MAX_LENGTH, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
              "pad_token": EOS, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"),
        "tokenizer_config.json": json.dumps(config, indent=1).encode("utf-8"),
    }


def _holds(folder: str, files: dict[str, bytes]) -> bool:
    """True if ``folder`` has exactly these defining files with exactly these contents."""
    for name in DEFINING_FILES:
        path = os.path.join(folder, name)
        if name not in files:
            if os.path.exists(path):
                return False
            continue
        try:
            with open(path, "rb") as f:
                if f.read() != files[name]:
                    return False
        except OSError:
            return False
    return True


def _write_tokenizer_folder(folder: str, vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> str:
    """Make ``folder`` hold this tokenizer: kept if it already does byte for byte, else written
    anew (a stale or damaged copy is replaced). Atomic: other processes of a multi-GPU run may
    be doing the same."""
    files = _tokenizer_files(vocab, merges)
    if _holds(folder, files):
        return folder
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    old = None
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            try:
                os.replace(folder, os.path.join(old, "x"))  # move the stale copy out of the way
            except OSError:
                pass  # another process moved it first
        try:
            os.rename(tmp, folder)
        except OSError:  # someone else finished first
            if not _holds(folder, files):
                raise
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    return folder


def full_clip_tokenizer_folder(cache_dir: str) -> str | None:
    """A folder with CLIP's vocab.json/merges.txt derived from open_clip's BPE file (checked
    against the derivation, and rewritten if it differs); without open_clip, a cached folder
    whose digest is CLIP's. None if there is neither."""
    folder = os.path.join(cache_dir, _FULL_NAME)
    bpe = open_clip_bpe_path()
    if bpe is None:
        if os.path.isfile(os.path.join(folder, "merges.txt")):
            if folder_digest([folder]) != CLIP_FOLDER_SHA256:
                raise TokenizerNotFound(
                    f"{folder}: a cached tokenizer folder that is not CLIP's vocabulary; delete it, "
                    "or install the BPE file it is derived from: pip install --no-deps open-clip-torch"
                )
            return folder
        return None
    merges = read_clip_bpe(bpe)
    vocab = vocab_from_merges(merges)
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe}: derived {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return _write_tokenizer_folder(folder, vocab, merges)


def tiny_clip_tokenizer_folder(cache_dir: str, merges: int = 400) -> str:
    """A small CLIP-style BPE (ids < 49408, CLIP's special tokens) for the built-in tiny models;
    learnt on every call (a tenth of a second), so a cached copy can never differ from it."""
    folder = os.path.join(cache_dir, _TINY_NAME)
    learnt = learn_merges(_TINY_WORDS, merges)
    return _write_tokenizer_folder(folder, vocab_from_merges(learnt), learnt)


def is_tokenizer_folder(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json"))


def load_clip_tokenizer(folder: str, pad_token: str | None = None, subfolder: str | None = None):
    """``transformers.CLIPTokenizer`` from a local folder, 77 positions, optional pad token."""
    from transformers import CLIPTokenizer

    kwargs = {"local_files_only": True, "model_max_length": MAX_LENGTH}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    if subfolder:
        kwargs["subfolder"] = subfolder
    tok = CLIPTokenizer.from_pretrained(folder, **kwargs)
    if pad_token is not None and tok.convert_tokens_to_ids(pad_token) != tok.pad_token_id:
        raise ValueError(f"{folder}: pad token {pad_token!r} is not in the vocabulary")
    return tok


def resolve_clip_tokenizers(
    pads: Sequence[str | None],
    tokenizer_dir: str | None,
    model_dir: str | None,
    cache_dir: str,
    builtin_tiny: bool,
    subfolders: Sequence[str] = ("tokenizer", "tokenizer_2"),
) -> tuple[list, TokenizerChoice]:
    """One CLIP tokenizer per text encoder, and which tokenizer that is.

    ``pads[i]`` is the pad token encoder ``i`` was trained with (None keeps the folder's);
    ``subfolders[i]`` is its tokenizer's folder in the diffusers layout; ``builtin_tiny``: the
    model is a built-in tiny one, which uses its own tiny BPE unless a folder is named.
    """
    n = len(pads)
    folders: list[str] | None = None
    if tokenizer_dir:
        if not os.path.isdir(tokenizer_dir):
            raise TokenizerNotFound(f"model.tokenizer: {tokenizer_dir} is not a folder")
        subs = [os.path.join(tokenizer_dir, s) for s in subfolders[:n]]
        if all(is_tokenizer_folder(s) for s in subs):
            folders, kind, source = subs, "model.tokenizer", tokenizer_dir
        elif is_tokenizer_folder(tokenizer_dir):
            folders, kind, source = [tokenizer_dir] * n, "model.tokenizer", tokenizer_dir
        else:
            raise TokenizerNotFound(
                f"model.tokenizer: {tokenizer_dir} holds neither {' and '.join(subfolders[:n])}/ sub-folders nor "
                "a CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)"
            )
    if folders is None and model_dir:
        subs = [os.path.join(model_dir, s) for s in subfolders[:n]]
        if all(is_tokenizer_folder(s) for s in subs):
            folders, kind, source = subs, "model folder", model_dir
    if folders is None and builtin_tiny:
        folders, kind = [tiny_clip_tokenizer_folder(cache_dir)] * n, "built-in tiny BPE"
        source = "the tiny model's own BPE (not CLIP's vocabulary)"
    if folders is None:
        full = full_clip_tokenizer_folder(cache_dir)
        if full:
            folders, kind, source = [full] * n, "CLIP BPE from open_clip", "CLIP BPE derived from open_clip's " + _BPE_FILE
    if folders is None:
        raise TokenizerNotFound(
            "no CLIP tokenizer available offline. Either set model.tokenizer to a local folder holding "
            "tokenizer/ and tokenizer_2/ (e.g. copied from a diffusers SDXL model) or one CLIP tokenizer "
            "(vocab.json + merges.txt), use a diffusers model folder that has them, or install the BPE "
            "file CLIP's vocabulary is derived from: pip install --no-deps open-clip-torch"
        )
    tokenizers = [load_clip_tokenizer(f, p) for f, p in zip(folders, pads)]
    return tokenizers, TokenizerChoice(kind, source, tuple(folders), folder_digest(folders))
