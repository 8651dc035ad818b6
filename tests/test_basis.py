"""Bases from real (tiny) checkpoints: identity, files, cache, agreement."""

import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora import archs, basis as basis_mod
from qrlora.basis import BasisCache, agreement, basis_from_checkpoint, compute_basis, load_basis, save_basis
from qrlora.checkpoint import FileFormatError
from qrlora.tiny.sdxl import build_components, clip_checkpoint_keys

RANK = 4


def diffusers_weights(components):
    """layer name -> weight, straight from the diffusers/transformers modules."""
    out = {f"unet.{k[:-7]}": v for k, v in components["unet"].state_dict().items() if k.endswith(".weight")}
    for prefix, comp in (("te1", "text_encoder"), ("te2", "text_encoder_2")):
        sd = clip_checkpoint_keys(components[comp].state_dict())
        out.update({f"{prefix}.{k[:-7]}": v for k, v in sd.items() if k.endswith(".weight")})
    return out


def test_checkpoint_basis_equals_basis_of_the_diffusers_modules(tiny_sdxl):
    """The key map and row slicing feed the decomposition exactly the diffusers weights."""
    b = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, targets=["unet.*", "te1.*", "te2.*"])
    assert b.arch == "sdxl" and len(b.targets) > 100
    weights = diffusers_weights(build_components(0))
    q, bid = compute_basis(lambda t: weights[t.name].half(), b.targets, "sdxl", RANK, device="cpu")
    assert bid == b.basis_id  # same weights, same dtype, another layout: same id
    for t in b.targets:
        assert torch.equal(q[t.name], b.q[t.name]), t.name
        assert torch.allclose(q[t.name].T @ q[t.name], torch.eye(RANK), atol=1e-5)
    # the same values in fp32 are another basis id (the id names exact bytes)
    _, bid32 = compute_basis(lambda t: weights[t.name], b.targets, "sdxl", RANK, device="cpu")
    assert bid32 != b.basis_id


def test_basis_id_depends_on_rank_and_layer_set_and_is_stable(tiny_sdxl):
    a = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK)
    assert a.basis_id == basis_from_checkpoint(tiny_sdxl.checkpoint, RANK).basis_id
    assert a.basis_id.startswith(f"sdxl-r{RANK}-")
    assert a.basis_id != basis_from_checkpoint(tiny_sdxl.checkpoint, RANK + 1).basis_id
    assert a.basis_id != basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, targets="sdxl-attn").basis_id
    assert len(a.targets) == len(archs.get("sdxl").select(a.targets, "sdxl-all"))


def test_basis_file_round_trip_and_errors(tiny_sdxl, tmp_path):
    b = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, targets="sdxl-attn")
    path = str(tmp_path / "basis.safetensors")
    save_basis(b, path)
    back = load_basis(path)
    assert (back.arch, back.rank, back.basis_id, back.target_spec) == ("sdxl", RANK, b.basis_id, "sdxl-attn")
    assert back.targets == b.targets  # names, shapes, original keys and rows survive
    assert all(torch.equal(back.q[n], b.q[n]) for n in b.names)
    assert back.source["base_model"] == os.path.basename(tiny_sdxl.checkpoint)

    tensors = load_file(path)
    first = f"{b.targets[0].name}.q"
    from qrlora.checkpoint import read_header

    meta = read_header(path)[1]
    tensors[first] = torch.zeros(3, 3)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(FileFormatError, match=rf"{first} has shape \(3, 3\), expected"):
        load_basis(path)
    with pytest.raises(FileFormatError, match="not a QR-LoRA basis file"):
        load_basis(tiny_sdxl.checkpoint)


def test_cache_hit_never_recomputes(tiny_sdxl, tmp_path, monkeypatch):
    cache = BasisCache(str(tmp_path / "cache"))
    first, hit = cache.get_or_compute(tiny_sdxl.checkpoint, RANK)
    assert not hit and os.path.exists(cache.path_for(first.basis_id))

    def fail(*a, **k):
        raise AssertionError("recomputed on a cache hit")

    monkeypatch.setattr(basis_mod, "basis_from_checkpoint", fail)
    started = time.perf_counter()
    again, hit = cache.get_or_compute(tiny_sdxl.checkpoint, RANK)
    assert hit and again.basis_id == first.basis_id
    assert time.perf_counter() - started < 5  # generous; bench/basis.py measures the real figure
    assert cache.get(first.basis_id).basis_id == first.basis_id
    # another request (rank) is a miss
    with pytest.raises(AssertionError, match="recomputed"):
        cache.get_or_compute(tiny_sdxl.checkpoint, RANK + 1)


def test_cache_notices_a_changed_checkpoint(tiny_sdxl, tmp_path):
    ckpt = str(tmp_path / "model.safetensors")
    shutil.copy(tiny_sdxl.checkpoint, ckpt)
    cache = BasisCache(str(tmp_path / "cache"))
    first, _ = cache.get_or_compute(ckpt, RANK)
    # a user merges something into the file: same path, new contents
    tensors = load_file(ckpt)
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, ckpt)
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second, hit = cache.get_or_compute(ckpt, RANK)
    assert not hit and second.basis_id != first.basis_id


def test_agreement_measures_precision_and_sign_flips(tiny_sdxl, tmp_path):
    exact = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK)
    sketch = exact.sketch()
    same = agreement(exact.names, sketch, exact.q)
    assert same.max == 0 and not same.missing

    bf16 = str(tmp_path / "bf16.safetensors")
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(tiny_sdxl.checkpoint).items()}, bf16)
    low = basis_from_checkpoint(bf16, RANK)
    assert low.basis_id != exact.basis_id
    measured = agreement(exact.names, sketch, low.q)
    assert 0 < measured.mean < 0.1
    flipped = dict(exact.q)
    name = exact.names[5]
    flipped[name] = exact.q[name] * torch.tensor([1.0, -1.0, 1.0, 1.0])
    bad = agreement(exact.names, sketch, flipped)
    assert bad.worst_layer == name and bad.max > 0.2
    assert name in bad.describe()
    partial = {n: exact.q[n] for n in exact.names[1:]}
    assert agreement(exact.names, sketch, partial).missing == [exact.names[0]]


def test_bad_checkpoints(tmp_path, tiny_sdxl):
    other = str(tmp_path / "other.safetensors")
    save_file({"foo.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(FileFormatError, match="unknown model layout"):
        basis_from_checkpoint(other, 2)
    with pytest.raises(FileFormatError, match="does not look like a FLUX.1 checkpoint"):
        basis_from_checkpoint(tiny_sdxl.checkpoint, 2, arch="flux")
    with pytest.raises(ValueError, match="rank 999 exceeds layer"):
        basis_from_checkpoint(tiny_sdxl.checkpoint, 999)
    with pytest.raises(ValueError, match="match no layer"):
        basis_from_checkpoint(tiny_sdxl.checkpoint, 2, targets=["unet.nothing.*"])
    with pytest.raises(ValueError, match="unknown SDXL target preset 'sdxl-everything'"):
        basis_from_checkpoint(tiny_sdxl.checkpoint, 2, targets="sdxl-everything")
