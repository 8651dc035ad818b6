"""Every place a basis is accepted by id measures it against the ΔR file's sketch: the WebUI
resolver (embedded, memory, cache, computed), the `qrlora` command (embedded, --basis, --base)
and the trainer's basis reuse. And: precompute, host progress, one cache entry for
import-official then export."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora import deltar
from qrlora.basis import BasisCache, basis_from_checkpoint, save_basis
from qrlora.checkpoint import read_header
from qrlora.cli import main
from qrlora_ext.bases import BasisResolver, state_progress
from tests.helpers import random_delta_r

RANK = 4


@pytest.fixture(scope="module")
def world(tiny_sdxl, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paths")
    b = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, targets="sdxl-attn")
    d = deltar.from_basis(b, random_delta_r(b, seed=5, scale=0.2), alpha=4.0)
    path = str(tmp / "dog.safetensors")
    deltar.save(d, path, torch.float32)
    return b, d, path


def flipped(q, name):
    out = dict(q)
    out[name] = q[name] * torch.tensor([1.0, -1.0, 1.0, 1.0])  # one column's sign: same id, another ΔW
    return out


def tampered_basis_file(b, path):
    """A basis file under the right id whose Q has one column flipped (its own sketch too)."""
    save_basis(type(b)(b.arch, b.rank, b.targets, flipped(b.q, b.names[2]), b.basis_id, b.target_spec), path)


# ----------------------------------------------------------------- the WebUI resolver
def test_resolver_embedded_basis_with_the_right_id_is_checked(world, tiny_sdxl, tmp_path):
    b, d, _ = world
    bad = deltar.DeltaR(d.arch, d.rank, d.alpha, d.mask, d.layers, d.targets, d.basis_id, d.sketch,
                        flipped(b.q, b.names[2]))
    logs = []
    r = BasisResolver(lambda: str(tmp_path / "cache"), log=logs.append)
    res = r.resolve(bad, "dog", tiny_sdxl.checkpoint)
    assert res.source == "computed" and torch.equal(res.q[b.names[2]], b.q[b.names[2]])
    assert any("not using the embedded basis" in m and b.basis_id in m for m in logs)


def test_resolver_cache_and_memory_with_the_right_id_are_checked(world, tmp_path):
    b, d, _ = world
    folder = str(tmp_path / "cache")
    os.makedirs(folder)
    tampered_basis_file(b, BasisCache(folder).path_for(b.basis_id))
    r = BasisResolver(lambda: folder, log=lambda m: None)
    res = r.resolve(d, "dog", None, policy="warn")
    assert res.refused  # the only basis on offer has the id but not the numbers; no checkpoint to compute from
    r.remember(b.basis_id, flipped(b.q, b.names[0]))
    assert r.resolve(d, "dog", None).refused


def test_resolver_computed_basis_from_a_tampered_cache_entry_is_a_mismatch(world, tiny_sdxl, tmp_path):
    b, d, _ = world
    folder = str(tmp_path / "cache")
    cache = BasisCache(folder)
    cache.get_or_compute(tiny_sdxl.checkpoint, RANK, d.names, "sdxl")
    path = cache.path_for(b.basis_id)
    tensors, meta = load_file(path), read_header(path)[1]
    tensors[f"{b.names[2]}.q"] = -tensors[f"{b.names[2]}.q"]
    save_file(tensors, path, metadata=meta)
    logs = []
    r = BasisResolver(lambda: folder, log=logs.append)
    res = r.resolve(d, "dog", tiny_sdxl.checkpoint, policy="refuse")
    assert not res.refused and torch.equal(res.q[b.names[2]], b.q[b.names[2]])  # recomputed, not the bad file
    assert r.computations == 1 and any("computing it again" in m for m in logs)


def test_resolver_same_id_but_other_numbers_follows_the_policy(world, tiny_sdxl, tmp_path, monkeypatch):
    """A checkpoint basis with the file's id whose Q disagrees with the sketch (e.g. another
    route rounded differently) is refused by `refuse` and warned about by `warn`."""
    b, d, _ = world
    r = BasisResolver(lambda: "", log=lambda m: None)
    monkeypatch.setattr(r, "_candidate", lambda d_, ckpt: (b.basis_id, flipped(b.q, b.names[1])))
    refused = r.resolve(d, "dog", tiny_sdxl.checkpoint, policy="refuse")
    assert refused.refused and "has the training basis's id" in refused.message and b.names[1] in refused.message
    warned = r.resolve(d, "dog", tiny_sdxl.checkpoint, policy="warn")
    assert not warned.refused and warned.disagreement > 0.2 and warned.message


def test_precompute_and_host_progress(tiny_sdxl, tmp_path):
    class State:
        textinfo, sampling_step, sampling_steps = None, 0, 0

    state, seen = State(), []
    report = state_progress(state)
    r = BasisResolver(lambda: str(tmp_path / "cache"), log=lambda m: None,
                      progress=lambda done, total, name: (seen.append(done), report(done, total, name)))
    basis, cached = r.precompute(tiny_sdxl.checkpoint, RANK, "sdxl-attn")
    assert not cached and seen == list(range(1, len(basis.targets) + 1))
    assert state.sampling_steps == state.sampling_step == len(basis.targets)
    assert f"{len(basis.targets)}/{len(basis.targets)}" in state.textinfo
    # a later generation with a file on those layers finds it: no second computation
    d = deltar.from_basis(basis, random_delta_r(basis, seed=2), alpha=4.0)
    fresh = BasisResolver(lambda: str(tmp_path / "cache"), log=lambda m: None)
    d.basis_id = "sdxl-r4-0000000000000000"  # not in the cache by id: goes through the checkpoint
    res = fresh.resolve(d, "x", tiny_sdxl.checkpoint, policy="apply")
    assert res.source == "computed" and fresh.computations == 0


# ----------------------------------------------------------------- the qrlora command
def test_cli_checks_a_basis_with_the_right_id(world, tmp_path, capsys):
    b, d, path = world
    bad_basis = str(tmp_path / "bad-basis.safetensors")
    tampered_basis_file(b, bad_basis)
    out = str(tmp_path / "lora.safetensors")
    assert main(["export", path, "--to", "kohya", "--basis", bad_basis, "-o", out]) == 2
    err = capsys.readouterr().err
    assert "has the training basis's id but" in err and b.names[2] in err and not os.path.exists(out)

    portable = str(tmp_path / "portable.safetensors")
    bad = deltar.DeltaR(d.arch, d.rank, d.alpha, d.mask, d.layers, d.targets, d.basis_id, d.sketch,
                        flipped(b.q, b.names[2]))
    deltar.save(bad, portable, torch.float32)
    assert main(["export", portable, "--to", "kohya", "-o", out]) == 2
    assert "embedded basis" in capsys.readouterr().err


def test_cli_base_checks_a_tampered_cache_file(world, tiny_sdxl, tmp_path, capsys):
    b, d, path = world
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "lora.safetensors")
    args = ["export", path, "--to", "kohya", "--base", tiny_sdxl.checkpoint, "--cache", cache, "-o", out]
    assert main(args) == 0
    file = BasisCache(cache).path_for(b.basis_id)
    tensors, meta = load_file(file), read_header(file)[1]
    tensors[f"{b.names[2]}.q"] = -tensors[f"{b.names[2]}.q"]
    save_file(tensors, file, metadata=meta)
    capsys.readouterr()
    assert main(args) == 0  # the bad file is not used: the basis is computed again
    assert "computed" in capsys.readouterr().out
    assert torch.equal(load_file(file)[f"{b.names[2]}.q"], b.q[b.names[2]])  # and the file was mended


def test_export_after_import_official_hits_the_cache(tiny_flux, tmp_path, capsys):
    from tests.test_official_import import write_official

    b = basis_from_checkpoint(tiny_flux.checkpoint, RANK, targets="flux-official")
    official = str(tmp_path / "official.safetensors")
    write_official(official, tiny_flux, b)
    # the official file lists its layers in another order than the model
    tensors = load_file(official)
    save_file(dict(reversed(list(tensors.items()))), official)
    cache = str(tmp_path / "cache")
    imported = str(tmp_path / "imported.safetensors")
    assert main(["import-official", official, "--base", tiny_flux.checkpoint, "--cache", cache, "-o", imported]) == 0
    assert "computed" in capsys.readouterr().out
    assert main(["export", imported, "--to", "kohya", "--base", tiny_flux.checkpoint, "--cache", cache,
                 "-o", str(tmp_path / "lora.safetensors")]) == 0
    assert "from cache" in capsys.readouterr().out
    assert len(os.listdir(BasisCache(cache).entries)) == 1
