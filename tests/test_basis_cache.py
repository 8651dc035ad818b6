"""The basis cache: keyed on contents, one entry file per request, every hit checked."""

import multiprocessing
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora import basis as basis_mod
from qrlora.basis import SKETCH_KEY, BasisCache, basis_from_checkpoint, check_basis, load_basis
from qrlora.checkpoint import read_header

RANK = 4
MID_Q = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"


def altered_copy(source, path, key=MID_Q, factor=1.5):
    """The same checkpoint with one target weight changed: same header, same size."""
    tensors = load_file(source)
    tensors[key] = tensors[key] * factor
    save_file(tensors, path, metadata=read_header(source)[1])
    return path


def no_recompute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("recomputed on a cache hit")

    monkeypatch.setattr(basis_mod, "basis_from_checkpoint", fail)


def test_checkpoint_replaced_with_same_path_size_and_mtime_is_a_miss(tiny_sdxl, tmp_path):
    ckpt = str(tmp_path / "model.safetensors")
    shutil.copy2(tiny_sdxl.checkpoint, ckpt)
    other = altered_copy(tiny_sdxl.checkpoint, str(tmp_path / "other.safetensors"))
    assert os.path.getsize(other) == os.path.getsize(ckpt)
    cache = BasisCache(str(tmp_path / "cache"))
    first, _ = cache.get_or_compute(ckpt, RANK)
    st = os.stat(ckpt)
    shutil.copy2(other, ckpt)  # `cp -p`: another model under the same path, size and mtime
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(ckpt).st_mtime_ns == st.st_mtime_ns and os.stat(ckpt).st_size == st.st_size
    second, hit = cache.get_or_compute(ckpt, RANK)
    assert not hit
    assert second.basis_id == basis_from_checkpoint(other, RANK).basis_id != first.basis_id


def test_copies_and_renames_keep_their_entry(tiny_sdxl, tmp_path, monkeypatch):
    cache = BasisCache(str(tmp_path / "cache"))
    first, _ = cache.get_or_compute(tiny_sdxl.checkpoint, RANK)
    moved = str(tmp_path / "renamed.safetensors")
    shutil.copy(tiny_sdxl.checkpoint, moved)  # new path, new mtime, same contents
    no_recompute(monkeypatch)
    again, hit = cache.get_or_compute(moved, RANK)
    assert hit and again.basis_id == first.basis_id


def test_layer_order_and_spelling_do_not_matter(tiny_sdxl, tmp_path, monkeypatch):
    """`import-official` asks in the file's layer order, `export` in the model's: one entry."""
    cache = BasisCache(str(tmp_path / "cache"))
    names = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, targets="sdxl-attn").names
    first, _ = cache.get_or_compute(tiny_sdxl.checkpoint, RANK, list(reversed(names)), "sdxl")
    no_recompute(monkeypatch)
    for spec in (names, sorted(names), "sdxl-attn"):
        again, hit = cache.get_or_compute(tiny_sdxl.checkpoint, RANK, spec, "sdxl")
        assert hit and again.basis_id == first.basis_id
    assert len(os.listdir(cache.entries)) == 1


def test_tampered_basis_file_with_the_right_id_is_not_handed_out(tiny_sdxl, tmp_path):
    cache = BasisCache(str(tmp_path / "cache"))
    good, _ = cache.get_or_compute(tiny_sdxl.checkpoint, RANK)
    path = cache.path_for(good.basis_id)
    tensors, meta = load_file(path), read_header(path)[1]
    name = good.names[3]
    tensors[f"{name}.q"] = tensors[f"{name}.q"] * torch.tensor([1.0, -1.0, 1.0, 1.0])  # one column's sign
    save_file(tensors, path, metadata=meta)
    assert cache.lookup(tiny_sdxl.checkpoint, RANK) is None
    assert good.basis_id in cache.rejected and "differs by" in cache.rejected
    messages = []
    again, hit = cache.get_or_compute(tiny_sdxl.checkpoint, RANK, log=messages.append)
    assert not hit and messages
    assert torch.equal(again.q[name], good.q[name])
    assert cache.lookup(tiny_sdxl.checkpoint, RANK) is not None  # the file was rewritten

    # the same Q with its stored sketch rewritten to match: the entry's record of the sketch catches it
    tensors = load_file(path)
    tensors[f"{name}.q"] = -tensors[f"{name}.q"]
    fake = basis_mod.Basis("sdxl", RANK, good.targets, {n: tensors[f"{n}.q"] for n in good.names}, good.basis_id)
    tensors[SKETCH_KEY] = fake.sketch()
    save_file(tensors, path, metadata=meta)
    assert cache.lookup(tiny_sdxl.checkpoint, RANK) is None and "another sketch" in cache.rejected


def test_basis_files_carry_their_sketch(tiny_sdxl, tmp_path):
    b = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, targets="sdxl-attn")
    path = str(tmp_path / "b.safetensors")
    basis_mod.save_basis(b, path)
    back = load_basis(path)
    assert torch.equal(back.stored_sketch, b.sketch())
    assert check_basis(back.names, back.stored_sketch, b.basis_id, back.q, back.basis_id).ok


def _store_many(folder, bases, checkpoint):
    cache = BasisCache(folder)
    for b in bases:
        cache.store(b, checkpoint, b.names, "sdxl")


def test_concurrent_writers_lose_no_entry(tiny_sdxl, tmp_path):
    """Several processes (two WebUIs, a trainer) write entries at once; all stay readable."""
    folder = str(tmp_path / "cache")
    names = basis_from_checkpoint(tiny_sdxl.checkpoint, 2, targets="sdxl-attn").names[:24]
    bases = [basis_from_checkpoint(tiny_sdxl.checkpoint, 2, targets=[n]) for n in names]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_store_many, args=(folder, bases[i::4], tiny_sdxl.checkpoint)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = BasisCache(folder)
    for b in bases:
        hit = cache.lookup(tiny_sdxl.checkpoint, 2, b.names, "sdxl")
        assert hit is not None and hit.basis_id == b.basis_id, b.names
    assert not [f for f in os.listdir(cache.entries) if not f.endswith(".json")]  # no temporaries left


def test_progress_is_reported_once_per_layer(tiny_sdxl):
    seen = []
    b = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, progress=lambda done, total, name: seen.append((done, total, name)))
    assert [d for d, _, _ in seen] == list(range(1, len(b.targets) + 1))
    assert {t for _, t, _ in seen} == {len(b.targets)} and sorted(n for _, _, n in seen) == sorted(b.names)


@pytest.mark.parametrize("limit", [0.01])
def test_check_basis_always_measures(tiny_sdxl, limit):
    b = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK)
    sketch = b.sketch()
    assert check_basis(b.names, sketch, b.basis_id, b.q, b.basis_id, limit).ok
    bad = dict(b.q)
    bad[b.names[0]] = -bad[b.names[0]]
    check = check_basis(b.names, sketch, b.basis_id, bad, b.basis_id, limit)
    assert check.same_id and not check.ok and "has the training basis's id but" in check.describe()
    assert not check_basis(b.names, None, "other-id", b.q, b.basis_id).ok  # nothing to measure, other id
