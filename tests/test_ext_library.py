"""The QR-LoRA folder: discovery, name resolution, hashes, card data; and fusion planning."""

import json
import os

import pytest
import torch

from qrlora_ext import planner
from qrlora_ext.library import Library, LookupFailed, describe, shown_metadata, trigger_words
from qrlora import deltar
from qrlora.basis import save_basis
from qrlora.checkpoint import tensor_data_sha256
from tests.helpers import synthetic_basis, synthetic_file


@pytest.fixture(scope="module")
def basis():
    return synthetic_basis()[0]


def write(basis, path, seed=1, **meta):
    d = synthetic_file(basis, seed=seed, metadata=meta)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    deltar.save(d, path, output_name=meta.get("ss_output_name", ""))
    return path


@pytest.fixture
def folder(tmp_path, basis):
    root = tmp_path / "QRLoRA"
    write(basis, str(root / "dog.safetensors"), 1, ss_output_name="doggo",
          ss_tag_frequency=json.dumps({"10_dog": {"dog": 10, "grass": 3}, "5_x": {"dog": 2, " sky ": 4}}))
    write(basis, str(root / "styles" / "watercolor.safetensors"), 2, **{"modelspec.trigger_phrase": "wtrclr style"})
    write(basis, str(root / "a" / "same.safetensors"), 3)
    write(basis, str(root / "b" / "same.safetensors"), 4)
    save_basis(basis, str(root / "basis" / f"{basis.basis_id}.safetensors"))  # the cache folder: not a card
    save_basis(basis, str(root / "stray-basis.safetensors"))  # a basis file elsewhere: not a card either
    (root / "old.ckpt").write_bytes(b"\x80\x04")
    (root / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return root


def library(folder):
    return Library(lambda: [str(folder)], excluded=lambda: [str(folder / "basis")])


def test_discovery(folder):
    lib = library(folder)
    names = sorted(e.name for e in lib.entries())
    assert names == ["a/same", "b/same", "broken", "dog", "styles/watercolor"]
    broken = next(e for e in lib.entries() if e.name == "broken")
    assert "not a safetensors file" in broken.error or "truncated" in broken.error or broken.error


def test_resolution(folder):
    lib = library(folder)
    assert lib.resolve("dog").name == "dog"
    assert lib.resolve("doggo").name == "dog"  # ss_output_name alias
    assert lib.resolve("watercolor").name == "styles/watercolor"
    assert lib.resolve("styles/watercolor").name == "styles/watercolor"
    assert lib.resolve("a/same").path.endswith(os.path.join("a", "same.safetensors"))
    with pytest.raises(LookupFailed, match="several files are called same"):
        lib.resolve("same")
    with pytest.raises(LookupFailed, match="only .safetensors files are read"):
        lib.resolve("old")
    with pytest.raises(LookupFailed, match="no such file"):
        lib.resolve("cat")


def test_new_files_are_found_without_refresh(folder, basis):
    lib = library(folder)
    lib.entries()
    write(basis, str(folder / "late.safetensors"), 9)
    assert lib.resolve("late").name == "late"


def test_hashes(folder):
    lib = library(folder)
    dog = lib.resolve("dog")
    short = lib.shorthash(dog)
    assert short == tensor_data_sha256(dog.path)[:12]
    assert lib.name_for_hash(short) == "dog"
    assert lib.name_for_hash("000000000000") is None


def test_card_data(folder):
    lib = library(folder)
    phrase, tags = trigger_words(lib.resolve("dog").metadata)
    assert phrase == "" and tags[:3] == [("dog", 12), ("sky", 4), ("grass", 3)]
    assert trigger_words(lib.resolve("watercolor").metadata)[0] == "wtrclr style"
    info = describe(lib.resolve("dog"))
    assert info["alias"] == "doggo" and info["rank"] == "4" and info["tags"][0] == "dog"
    assert info["metadata"]["qrlora.layers"] == "3 layers"
    assert all(k.startswith(("ss_", "modelspec.", "qrlora.", "sshs_")) for k in info["metadata"])
    json.dumps(info)  # what the API returns must serialise
    assert shown_metadata({"other": "x", "ss_a": "1"}) == {"ss_a": "1"}


def test_fusion_is_linear_with_scales_and_text_encoder_multipliers():
    b, _ = synthetic_basis(shapes=((8, 6), (8, 6)), prefix="unet.blocks")
    tb, _ = synthetic_basis(shapes=((8, 6),), prefix="te1.layers", seed=1)
    files = [synthetic_file(b, seed=1, alpha=2.0), synthetic_file(b, seed=2, alpha=8.0)]
    members = [planner.Member("a", "a", 0, 0, files[0], te=0.0, unet=0.5),
               planner.Member("b", "b", 0, 0, files[1], te=0.0, unet=-1.5)]
    group = planner.fuse(members, b.q, "id")
    for name in b.names:
        expected = 0.5 * files[0].scale * files[0].layers[name] - 1.5 * files[1].scale * files[1].layers[name]
        assert torch.allclose(group.layers[name].delta, expected, atol=1e-6)
        assert group.layers[name].q is b.q[name]
    te_file = synthetic_file(tb, seed=3)
    m = planner.Member("t", "t", 0, 0, te_file, te=2.0, unet=0.0)
    assert m.coefficient("te1.layers.0.to_q") == 2.0 * te_file.scale
    zero = planner.fuse([planner.Member("t", "t", 0, 0, te_file, te=0.0, unet=1.0)], tb.q, "z")
    assert zero.layers == {}  # nothing to apply: no layer is patched at all


def test_planner_fusion_refuses_what_qrlora_fuse_refuses():
    """One fusion: the planner sums through qrlora.fusion, with its refusals."""
    from qrlora.fusion import IncompatibleFiles

    b, _ = synthetic_basis(shapes=((8, 6),))
    triu, none = synthetic_file(b, seed=1), synthetic_file(b, seed=2, mask="none")
    with pytest.raises(IncompatibleFiles, match=r"cannot fuse <qrlora:a> and <qrlora:b>: different mask \(triu vs none\)"):
        planner.fuse([planner.Member("a", "a", 0, 0, triu, 1.0, 1.0), planner.Member("b", "b", 0, 0, none, 1.0, 1.0)],
                     b.q, "x")
    silent = synthetic_file(b, seed=3)
    silent.alpha = 0.0
    with pytest.raises(IncompatibleFiles, match=r"<qrlora:z> has alpha 0"):
        planner.fuse([planner.Member("z", "z", 0, 0, silent, 1.0, 1.0)], b.q, "y")


def test_identity_changes_with_file_version_and_multipliers(basis):
    d = synthetic_file(basis)
    m = planner.Member("a", "/x/a.safetensors", 1, 10, d, 1.0, 1.0)
    base = planner.identity(d.basis_id, [m])
    assert planner.identity(d.basis_id, [planner.Member("a", "/x/a.safetensors", 2, 10, d, 1.0, 1.0)]) != base
    assert planner.identity(d.basis_id, [planner.Member("a", "/x/a.safetensors", 1, 10, d, 0.5, 1.0)]) != base
    assert planner.identity(d.basis_id, [planner.Member("b", "/x/a.safetensors", 1, 10, d, 1.0, 1.0)]) == base


def test_forge_shape_cache_never_keeps_an_old_model_alive():
    """Host-side caches are per model: after a model change the old checkpoint's modules can
    be freed (the shape cache held the model itself for the last four models)."""
    import gc
    import weakref

    from qrlora_ext.forge import ForgeAdapter

    class Patcher:
        def __init__(self, model):
            self.model = model

    adapter = ForgeAdapter(engine=None, shared=None)
    old = torch.nn.Linear(4, 3)
    assert adapter._shapes_of(Patcher(old))["weight"] == (3, 4)
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None
    new = torch.nn.Linear(5, 2)
    assert adapter._shapes_of(Patcher(new))["weight"] == (2, 5)
    assert len(adapter._shapes) == 1
