"""lbw= in both hosts' stand-ins: every layer gets exactly Σᵢ λᵢ·wᵢ(block)·sᵢ·Q·ΔRᵢ (one fused
sum), bad lists skip only their tag, and the tags survive infotext paste."""

import pytest
import torch

from qrlora import deltar
from qrlora.basis import basis_from_checkpoint
from qrlora_ext import blocks, keymap, syntax
from tests.helpers import random_delta_r
from tests.hosts import models
from tests.hosts.harness import Host
from tests.hosts.world import check_original, make_world, open_host, original_rows, parameters, target_weight

pytestmark = pytest.mark.usefixtures("single_threaded")

IDS12 = blocks.layouts_for("sdxl")[0].ids


@pytest.fixture(scope="module")
def world(tiny_sdxl, tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("ext-blocks-world")), tiny_sdxl.checkpoint)


@pytest.fixture(params=["a1111", "forge"])
def host(request, world):
    h = open_host(request.param, world)
    yield h
    h.close()


def check_blocks(host, world, terms):
    """terms: (file, λ, {block id: weight}); every targeted weight is W + Σ λ·w(block)·s·Q·ΔR."""
    touched = set()
    for target in world.basis.targets:
        key, current = target_weight(host, target)
        touched.add(key)
        expected = original_rows(host.original, host, target, key).double()
        block = blocks.block_of("sdxl", target.key)
        for file, lam, weights in terms:
            d = world.files[file]
            if target.name in d.layers:
                w = weights.get(block, 1.0)
                expected = expected + lam * w * d.scale * (world.basis.q[target.name].double() @ d.layers[target.name].double())
        err = (current.double() - expected).abs().max().item()
        assert err <= 1e-6, f"{target.name} ({block}): off by {err:.3g}"
    for key, value in parameters(host).items():
        if key not in touched:
            assert torch.equal(value, host.original[key]), f"{key} changed"


def test_per_block_weights_fuse_exactly(host, world):
    dog = [0.5, 1, 0, 2, -1, 0.25, 1, 0, 0.75, 1, 1, 3]
    p = host.generate(f"<qrlora:dog:0.8:lbw={','.join(str(v) for v in dog)}> <qrlora:style:0.6:lbw=style>")
    assert not p.comments, p.comments
    groups = host.adapter.current if host.kind == "a1111" else p.qrlora_plan.groups
    assert len(groups) == 1  # still one fused Σ per layer
    check_blocks(host, world, [("dog", 0.8, dict(zip(IDS12, dog))), ("style", 0.6, {b: float(b == "OUT01") for b in IDS12})])
    # te=/unet= multiply with BASE / the UNet blocks
    host.generate("<qrlora:dog:1:te=0.5:lbw=content>")
    weights = {b: float(b == "OUT00") for b in IDS12}
    check_blocks(host, world, [("dog", 1.0, {b: w * (0.5 if b == "BASE" else 1.0) for b, w in weights.items()})])
    host.generate("nothing")
    check_original(host, host.original)


def test_changing_block_weights_reapplies_without_basis_work(host, world):
    host.generate("<qrlora:dog:1:lbw=ALL>")
    before = host.engine.resolver.computations
    for preset in ("content", "style", "OUTALL"):
        host.generate(f"<qrlora:dog:1:lbw={preset}>")
    assert host.engine.resolver.computations == before
    presets = host.engine.presets
    check_blocks(host, world, [("dog", 1.0, dict(zip(IDS12, blocks.resolve("OUTALL", "sdxl", presets).values)))])


@pytest.mark.parametrize("tag, expected", [
    ("<qrlora:dog:1:lbw=" + ",".join(["1"] * 61) + ">", "<qrlora:dog> not applied: lbw= has 61 weights; SDXL takes 12"),
    ("<qrlora:dog:1:lbw=NOPE>", "<qrlora:dog> not applied: unknown preset 'NOPE'"),
    ("<qrlora:dog:1:lbw=1,1,x,1,1,1,1,1,1,1,1,1>", "<qrlora:dog>: lbw= weight 3 ('x') is not a number"),
    ("<qrlora:dog:1:lbw=1,1,1>", "<qrlora:dog>: lbw= has 3 weights; expected SDXL 12 or 20"),
])
def test_bad_block_weights_skip_only_their_tag(host, world, tag, expected):
    p = host.generate(f"{tag} <qrlora:style:0.5>")
    text = " | ".join(p.comments)
    assert expected in text and len(p.comments) == 1, text
    check_blocks(host, world, [("style", 0.5, {})])


def test_paste_keeps_block_weights():
    prompt = "a <qrlora:dog:0.8:lbw=content:te=0> b"
    out = syntax.rewrite_prompt(prompt, {"dog": "aaaaaaaaaaaa"}, {"aaaaaaaaaaaa": "pets/dog2"}.get)
    assert out == "a <qrlora:pets/dog2:0.8:lbw=content:te=0> b"


def test_forge_flux_block_weights(tiny_flux, tmp_path):
    b = basis_from_checkpoint(tiny_flux.checkpoint, 4)
    folder = tmp_path / "QRLoRA"
    d = deltar.from_basis(b, random_delta_r(b, seed=5, scale=0.3), alpha=2.0)
    deltar.save(d, str(folder / "subject.safetensors"))
    d = deltar.load(str(folder / "subject.safetensors"))
    ids = blocks.layouts_for("flux")[0].ids
    weights = {"D00": 0.0, "D01": 2.0, "S00": 0.5, "S01": -1.0}
    h = Host("forge", str(tmp_path), str(folder), basis_dir=str(tmp_path / "basis"))
    try:
        sd = models.forge_flux(tiny_flux.checkpoint)
        h.load_model(sd)
        original = {k: v.detach().clone() for k, v in sd.forge_objects_original.unet.model.named_parameters()}
        lbw = ",".join(str(weights.get(i, 1.0)) for i in ids)
        p = h.generate(f"<qrlora:subject:0.7:lbw={lbw}>")
        assert not p.comments, p.comments
        expected = {k: v.double() for k, v in original.items()}
        for t in b.targets:
            fp = keymap.forge_param(t, "flux")
            w = weights[blocks.block_of("flux", t.key)]
            dw = 0.7 * w * d.scale * (b.q[t.name].double() @ d.layers[t.name].double())
            if fp.offset:
                expected[fp.name][fp.offset[1]:fp.offset[1] + fp.offset[2]] += dw
            else:
                expected[fp.name] += dw
        params = dict(sd.forge_objects_original.unet.model.named_parameters())
        for k, v in params.items():
            assert (v.double() - expected[k]).abs().max() <= 1e-6, k
        p = h.generate("<qrlora:subject:1:lbw=content>")
        assert any("preset 'content' has no FLUX list" in c for c in p.comments), p.comments
    finally:
        h.close()
