"""CLIP tokenizers without a hub: the vocabulary derived from open_clip's BPE file, the tiny
built-in BPE, SDXL padding and the order in which tokenizers are looked for."""

import json
import os

import pytest

from trainer import tokenizers as T

needs_bpe = pytest.mark.skipif(T.open_clip_bpe_path() is None, reason="open-clip-torch's BPE file is not installed")


def _merges(folder):
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("#version")
    return [tuple(line.split()) for line in lines[1:]]


def _vocab(folder):
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        return json.load(f)


def reference_bpe(text, vocab, merges):
    """CLIP's tokenizer rules written out plainly: clean whitespace, lower-case, split with
    CLIP's pattern, bytes -> printable symbols, ``</w>`` on the last, then repeatedly merge
    every occurrence of the lowest-ranked adjacent pair."""
    regex = pytest.importorskip("regex")
    pattern = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE
    )
    ranks = {m: i for i, m in enumerate(merges)}
    symbols = T.byte_symbols()
    ids = [vocab[T.BOS]]
    for token in pattern.findall(" ".join(text.split()).lower()):
        word = [symbols[b] for b in token.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            rank, best = min((ranks.get(p, float("inf")), p) for p in zip(word, word[1:]))
            if rank == float("inf"):
                break
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        ids += [vocab[w] for w in word]
    return ids + [vocab[T.EOS]]


SENTENCES = [
    "a photo of a dog",
    "A  Watercolor painting of a fox,\ttrending on ArtStation!!",
    "it's 2024: naïve café — 3.5x zoom, sks dog's ball",
]


def test_byte_symbols():
    table = T.byte_symbols()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)  # space is not printable here
    assert list(table.values())[:2] == ["!", '"']  # vocabulary order: printable bytes first


@needs_bpe
def test_full_clip_vocabulary(tmp_path):
    folder = T.full_clip_tokenizer_folder(str(tmp_path))
    vocab, merges = _vocab(folder), _merges(folder)
    assert len(vocab) == 49408 and len(merges) == 48894
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125 and vocab["dog</w>"] == 1929

    tok = T.load_clip_tokenizer(folder)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    for text in SENTENCES:
        assert tok(text).input_ids == reference_bpe(text, vocab, merges), text
    # a second call uses the cache; the folder is CLIP's by its recorded digest
    assert T.full_clip_tokenizer_folder(str(tmp_path)) == folder
    assert T.folder_digest([folder]) == T.CLIP_FOLDER_SHA256


@needs_bpe
def test_sdxl_padding_and_truncation(tmp_path):
    toks, choice = T.resolve_clip_tokenizers((T.EOS, "!"), None, None, str(tmp_path), builtin_tiny=False)
    assert "open_clip" in choice.source
    one, two = (t("a dog", padding="max_length", max_length=77, truncation=True).input_ids for t in toks)
    assert one[:4] == two[:4] == [49406, 320, 1929, 49407]
    assert set(one[4:]) == {49407} and set(two[4:]) == {0}  # CLIP-L pads with the end token, bigG with "!"
    # As with the hub's SDXL tokenizer_2, the pad token "!" is a special token there, so a
    # "!" in a caption is id 0 on its own instead of part of a BPE word ("!!</w>" for CLIP-L).
    vocab = _vocab(T.full_clip_tokenizer_folder(str(tmp_path)))
    assert toks[0]("wow!!").input_ids == [49406, vocab["wow</w>"], vocab["!!</w>"], 49407]
    assert toks[1]("wow!!").input_ids == [49406, vocab["wow</w>"], 0, 0, 49407]
    long = toks[1](" ".join(["dog"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_tiny_tokenizer(tmp_path):
    folder = T.tiny_clip_tokenizer_folder(str(tmp_path / "a"))
    again = T.tiny_clip_tokenizer_folder(str(tmp_path / "b"))
    assert _vocab(folder) == _vocab(again) and _merges(folder) == _merges(again)  # deterministic
    vocab = _vocab(folder)
    assert 600 < len(vocab) < 49408 and max(vocab.values()) == len(vocab) - 1
    assert vocab[T.EOS] == len(vocab) - 1 and vocab[T.BOS] == len(vocab) - 2
    pad_bang = T.load_clip_tokenizer(folder, "!")
    assert pad_bang.model_max_length == 77 and pad_bang.pad_token_id == 0
    ids = pad_bang("a photo of a dog", padding="max_length", max_length=77).input_ids
    assert pad_bang.convert_ids_to_tokens(ids[:7]) == [T.BOS, "a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>", T.EOS]
    assert len(ids) == 77 and set(ids[7:]) == {0}
    # words outside the learnt list still encode (down to single bytes)
    tok = T.load_clip_tokenizer(folder)
    for text in SENTENCES:
        assert tok(text).input_ids == reference_bpe(text, vocab, _merges(folder)), text


def test_resolution_order(tmp_path, monkeypatch):
    tiny = T.tiny_clip_tokenizer_folder(str(tmp_path / "cache"))
    # a user folder in the diffusers layout, and a model folder with its own tokenizers
    for root in ("user", "model"):
        for sub in ("tokenizer", "tokenizer_2"):
            os.makedirs(tmp_path / root / sub)
            for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                with open(os.path.join(tiny, f), encoding="utf-8") as src:
                    (tmp_path / root / sub / f).write_text(src.read(), encoding="utf-8")
    cache = str(tmp_path / "cache")
    pads = (T.EOS, "!")
    toks, choice = T.resolve_clip_tokenizers(pads, str(tmp_path / "user"), str(tmp_path / "model"), cache, False)
    assert choice.source == str(tmp_path / "user") and [t.pad_token_id for t in toks] == [toks[0].eos_token_id, 0]
    assert choice.kind == "model.tokenizer" and choice.sha256 == T.folder_digest(choice.folders)
    toks, choice = T.resolve_clip_tokenizers(pads, str(tmp_path / "user" / "tokenizer"), None, cache, False)
    assert choice.source.endswith("tokenizer") and len(toks) == 2  # one CLIP tokenizer folder for both
    toks, choice = T.resolve_clip_tokenizers(pads, None, str(tmp_path / "model"), cache, False)
    assert choice.source == str(tmp_path / "model") and choice.kind == "model folder"
    with pytest.raises(T.TokenizerNotFound, match="neither"):
        T.resolve_clip_tokenizers(pads, str(tmp_path), None, cache, False)
    # a built-in tiny model: a named folder still wins over its own BPE
    toks, choice = T.resolve_clip_tokenizers(pads, str(tmp_path / "user"), None, cache, builtin_tiny=True)
    assert choice.kind == "model.tokenizer"

    monkeypatch.setattr(T, "open_clip_bpe_path", lambda: None)
    empty = str(tmp_path / "empty-cache")
    toks, choice = T.resolve_clip_tokenizers(pads, None, None, empty, builtin_tiny=True)
    assert "tiny" in choice.source and len(toks[0]) < 49408
    with pytest.raises(T.TokenizerNotFound, match="open-clip-torch"):
        T.resolve_clip_tokenizers(pads, None, None, empty, builtin_tiny=False)


def _fake_clip_folder(cache):
    """A valid CLIP-style tokenizer where the full CLIP one would be cached, but not CLIP's."""
    merges = T.learn_merges(T._TINY_WORDS, 50)
    return T._write_tokenizer_folder(os.path.join(cache, "clip-bpe-16e6"), T.vocab_from_merges(merges), merges)


def test_builtin_tiny_ignores_a_cached_full_vocabulary(tmp_path, monkeypatch):
    """The built-in tiny model's tokenizer does not depend on what a cache holds or on open_clip."""
    pads = (T.EOS, "!")
    monkeypatch.setattr(T, "open_clip_bpe_path", lambda: None)
    _, clean = T.resolve_clip_tokenizers(pads, None, None, str(tmp_path / "clean"), builtin_tiny=True)
    filled = str(tmp_path / "filled")
    _fake_clip_folder(filled)
    _, again = T.resolve_clip_tokenizers(pads, None, None, filled, builtin_tiny=True)
    assert again.kind == clean.kind == "built-in tiny BPE" and again.sha256 == clean.sha256


def test_cached_folders_that_differ_from_the_derivation_are_not_used(tmp_path, monkeypatch):
    cache = str(tmp_path)
    tiny = T.tiny_clip_tokenizer_folder(cache)
    good = T.folder_digest([tiny])
    with open(os.path.join(tiny, "merges.txt"), "a", encoding="utf-8") as f:
        f.write("d og</w>\n")  # a stale or damaged cached copy
    assert T.folder_digest([T.tiny_clip_tokenizer_folder(cache)]) == good  # rewritten from the derivation
    # without open_clip, a cached "CLIP" folder is trusted only with CLIP's digest
    monkeypatch.setattr(T, "open_clip_bpe_path", lambda: None)
    _fake_clip_folder(cache)
    with pytest.raises(T.TokenizerNotFound, match="not CLIP's vocabulary"):
        T.full_clip_tokenizer_folder(cache)
