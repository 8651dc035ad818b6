"""Latent and text-encoder caches: content keys, invalidation, persistence, atomic writes."""

import json
import os
import struct

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import trainer.cache as cache_mod
from trainer.cache import LatentCache, TextCache
from trainer.plan import ImageItem

GEOM = ((80, 53), (0, 2))  # (resized_wh, crop_left_top), as crop_geometry returns it


@pytest.fixture
def item(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (96, 64), (10, 20, 30)).save(path)
    return ImageItem(path=str(path), caption="x", repeats=1, is_reg=False)


def entries(folder):
    return sorted(f for _, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("on_disk", [False, True])
def test_latent_hit_and_miss(tmp_path, item, on_disk):
    cache = LatentCache(str(tmp_path / "c") if on_disk else None, "vae:abc")
    key = cache.key_for(item, (80, 48), GEOM, False)
    assert cache.get(key) is None and key not in cache
    lat = torch.randn(4, 6, 10)
    cache.put(key, lat)
    assert key in cache and torch.equal(cache.get(key), lat)
    assert (cache.hits, cache.misses) == (1, 1)


def test_key_changes_with_every_input(tmp_path, item):
    cache = LatentCache(None, "vae:abc")
    base = cache.key_for(item, (80, 48), GEOM, False)
    assert cache.key_for(item, (80, 48), GEOM, False) == base  # stable
    others = [
        cache.key_for(item, (64, 64), GEOM, False),
        cache.key_for(item, (80, 48), ((80, 54), (0, 2)), False),
        cache.key_for(item, (80, 48), ((80, 53), (0, 3)), False),
        cache.key_for(item, (80, 48), GEOM, True),
        LatentCache(None, "vae:other").key_for(item, (80, 48), GEOM, False),
    ]
    assert len({base, *others}) == 6
    # Same bytes elsewhere -> same key (content, not path).
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(item.path, "rb").read())
    assert cache.key_for(ImageItem(str(copy), "y", 3, True), (80, 48), GEOM, False) == base
    # Edited image -> new key, even with the same size and path.
    Image.new("RGB", (96, 64), (11, 20, 30)).save(item.path)
    st = os.stat(item.path)
    os.utime(item.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.key_for(item, (80, 48), GEOM, False) != base


def test_disk_cache_reused_across_runs_and_invalidated_by_identity(tmp_path, item):
    folder = str(tmp_path / "cache")
    first = LatentCache(folder, "vae:abc")
    key = first.key_for(item, (80, 48), GEOM, False)
    first.put(key, torch.ones(4, 6, 10, dtype=torch.float16))
    again = LatentCache(folder, "vae:abc")  # a later run
    assert torch.equal(again.get(again.key_for(item, (80, 48), GEOM, False)), torch.ones(4, 6, 10, dtype=torch.float16))
    other = LatentCache(folder, "vae:new-weights")
    assert other.get(other.key_for(item, (80, 48), GEOM, False)) is None


def test_stored_as_safetensors(tmp_path, item):
    cache = LatentCache(str(tmp_path), "vae:abc")
    key = cache.key_for(item, (80, 48), GEOM, False)
    cache.put(key, torch.zeros(4, 6, 10))
    path = cache.path(key)
    assert path.endswith(key + ".safetensors") and os.path.dirname(path).endswith(os.path.join("latents", key[:2]))
    raw = open(path, "rb").read()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])  # a safetensors header, not a pickle
    assert header["__metadata__"] == {"kind": "latents", "identity": "vae:abc"}
    with safe_open(path, framework="pt") as f:
        assert list(f.keys()) == ["latents"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path, item, monkeypatch):
    folder = tmp_path / "c"
    cache = LatentCache(str(folder), "vae:abc")
    key = cache.key_for(item, (80, 48), GEOM, False)

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "save_file", broken_save)
    with pytest.raises(OSError):
        cache.put(key, torch.zeros(2))
    assert entries(folder) == []  # no half-written entry, no temporary left behind
    monkeypatch.undo()
    cache.put(key, torch.zeros(2))
    assert entries(folder) == [key + ".safetensors"]


def test_unreadable_entry_is_a_miss(tmp_path, item):
    cache = LatentCache(str(tmp_path), "vae:abc")
    key = cache.key_for(item, (80, 48), GEOM, False)
    os.makedirs(os.path.dirname(cache.path(key)))
    open(cache.path(key), "wb").write(b"garbage")
    assert cache.get(key) is None
    cache.put(key, torch.ones(3))  # overwritten in place
    assert torch.equal(cache.get(key), torch.ones(3))


@pytest.mark.parametrize("on_disk", [False, True])
def test_text_cache(tmp_path, on_disk):
    folder = str(tmp_path) if on_disk else None
    cache = TextCache(folder, "clip-l+g:123,skip2")
    hidden = torch.randn(77, 8)
    outputs = {"hidden": hidden, "pooled": hidden[0]}  # views of one storage are fine
    key = cache.key_for("sks dog, grass")
    assert cache.get(key) is None
    cache.put(key, outputs)
    got = cache.get(key)
    assert set(got) == {"hidden", "pooled"} and torch.equal(got["hidden"], hidden) and torch.equal(got["pooled"], hidden[0])
    # Exact caption: any difference (order, spacing, dropout's "") is another key.
    assert len({key, cache.key_for("grass, sks dog"), cache.key_for("sks dog,  grass"), cache.key_for("")}) == 4
    assert TextCache(folder, "other-te").key_for("sks dog, grass") != key
    if on_disk:
        assert torch.equal(TextCache(folder, "clip-l+g:123,skip2").get(key)["hidden"], hidden)
