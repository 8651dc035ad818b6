"""Host-specific behaviour (A1111's Lora machinery, Forge's patchers) and basis resolution
(embedded, cache, computed, mismatch policy) in the stand-in hosts."""

import os

import pytest
import torch

from qrlora import deltar
from qrlora.basis import basis_from_checkpoint, save_basis
from qrlora.checkpoint import SafetensorsFile, save_atomic
from tests.helpers import random_delta_r
from tests.hosts.harness import P
from tests.hosts.world import check_applied, check_original, make_world, open_host, target_weight


pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def world(tiny_sdxl, tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("ext-hosts")), tiny_sdxl.checkpoint)




@pytest.fixture
def a1111(world):
    h = open_host("a1111", world)
    yield h
    h.close()


@pytest.fixture
def forge(world):
    h = open_host("forge", world)
    yield h
    h.close()


# ----------------------------------------------------------------- A1111
def test_a1111_uses_lora_module_types_and_unload_restores_everything(world):
    h = open_host("a1111", world)
    nets = h.networks
    original_load = nets.load_networks._qrlora_original
    assert getattr(nets.module_types[0], "qrlora_type", False)
    h.generate("<qrlora:dog:1>")
    ours = [n for n in nets.loaded_networks if getattr(n, "qrlora", False)]
    assert len(ours) == 1 and ours[0].name.startswith("qrlora/dog/")
    assert all(type(m).__name__ == "NetworkModuleQRLora" for m in ours[0].modules.values())
    h.script_callbacks.script_unloaded_callback()
    assert nets.load_networks is original_load
    assert not any(getattr(t, "qrlora_type", False) for t in nets.module_types)
    assert not any(getattr(n, "qrlora", False) for n in nets.loaded_networks)
    h.script_callbacks.callback_map.clear()  # already unloaded
    h.close()


def test_a1111_per_layer_runtime_error_is_counted_not_raised(a1111, world):
    h = a1111
    p = P(h.sd_model, "<qrlora:dog:1>")
    h.extra_networks.activate(p, p.extra_network_data)
    target = next(t for t in world.basis.targets if t.name.startswith("unet.") and not t.rows)
    key, _ = target_weight(h, target)
    layer = h.sd_model.get_submodule(key[: -len(".weight")])
    saved = layer.weight, layer.in_features
    layer.weight = torch.nn.Parameter(torch.zeros(layer.out_features, layer.in_features + 1), requires_grad=False)
    layer.in_features += 1
    try:
        h.sample_a1111()  # the mismatching layer raises RuntimeError inside Lora's apply: counted
    finally:
        layer.weight, layer.in_features = saved
    h.extra_networks.deactivate(p, p.extra_network_data)
    errors = [c for c in p.comments if c.startswith("Networks with errors: qrlora/dog/")]
    assert errors and errors[0].endswith("(1)"), p.comments


def test_a1111_functional_mode(a1111, world):
    h = a1111
    h.shared.opts.lora_functional = True
    try:
        h.generate("<qrlora:dog:0.6>")
        target = next(t for t in world.basis.targets if t.name.startswith("unet.") and not t.rows)
        key, _ = target_weight(h, target)
        layer = h.sd_model.get_submodule(key[: -len(".weight")])
        assert torch.equal(layer.weight, h.original[key])  # functional mode leaves Linear weights alone
        x = torch.randn(3, layer.in_features)
        w = h.original[key].double() + world.delta_w({"dog": 0.6}, target.name)
        bias = layer.bias.double() if layer.bias is not None else None
        expected = torch.nn.functional.linear(x.double(), w, bias)
        with torch.no_grad():
            assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    finally:
        h.shared.opts.lora_functional = False


# ----------------------------------------------------------------- Forge
def _qrlora_ids(patcher):
    return [k for k in patcher.lora_patches if str(k[0]).startswith("qrlora:")]


def test_forge_patch_identity_follows_files_and_lambda(forge, world):
    h = forge
    loader = h.sd_model.forge_objects_original.unet.model.lora_loader
    h.generate("<qrlora:dog:0.5>")
    first = _qrlora_ids(h.sd_model.forge_objects.unet)
    merges = loader.merges
    h.generate("<qrlora:dog:0.5>")
    assert _qrlora_ids(h.sd_model.forge_objects.unet) == first and loader.merges == merges  # nothing re-merged
    h.generate("<qrlora:dog:0.6>")
    assert _qrlora_ids(h.sd_model.forge_objects.unet) != first and loader.merges == merges + 1
    check_applied(h, world, h.original, {"dog": 0.6})
    assert all(k[1:] == (1.0, 1.0, False) for k in first)  # strength 1, offline (fp32 storage)


def test_forge_lambda_change_while_lora_skips_its_reset(forge, world):
    h = forge
    for lam in (0.5, 0.9, 0.9, -0.2):  # the LoRA extension returns early from the 2nd generation on
        h.generate(f"<lora:style_lora:0.6> <qrlora:dog:{lam}>")
        check_applied(h, world, h.original, {"dog": lam, "style": 0.6})
    clip = h.sd_model.forge_objects_after_applying_lora.clip
    assert getattr(clip, "_qrlora_base", None) is not None
    assert not hasattr(clip._qrlora_base, "_qrlora_base")  # patched once, never on top of our own clone


def test_forge_online_mode_for_quantized_storage(forge, world):
    h = forge
    from backend.args import dynamic_args

    model = h.sd_model.forge_objects_original.unet.model
    dynamic_args["online_lora"] = True
    model.storage_dtype = "gguf"
    try:
        h.generate("<qrlora:dog:1>")
        check_original(h, h.original)  # online: nothing merged into the stored weights
        ids = _qrlora_ids(h.sd_model.forge_objects.unet)
        assert ids and all(k[3] is True for k in ids)
        layer = model.get_submodule("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q")
        assert "weight" in layer.forge_online_loras
    finally:
        dynamic_args["online_lora"] = False
        model.storage_dtype = torch.float32


# ----------------------------------------------------------------- basis resolution
@pytest.fixture(scope="module")
def alien(world, tmp_path_factory):
    """A checkpoint whose weights differ by a few percent, and a ΔR file trained on it."""
    folder = str(tmp_path_factory.mktemp("alien"))
    src = SafetensorsFile(world.checkpoint)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for k in src.keys:
        t = src.tensor(k)
        if t.is_floating_point() and t.dim() == 2:
            t = (t.float() * (1 + 0.05 * torch.randn(t.shape, generator=g))).to(t.dtype)
        tensors[k] = t
    path = os.path.join(folder, "other-sdxl.safetensors")
    save_atomic(tensors, path, src.metadata)
    b = basis_from_checkpoint(path, world.basis.rank, targets=["sdxl-all", "sdxl-te"])
    d = deltar.from_basis(b, random_delta_r(b, seed=9, scale=0.3), alpha=4.0)
    deltar.save(d, os.path.join(world.qrlora_dir, "alien.safetensors"))
    world.files["alien"] = deltar.load(os.path.join(world.qrlora_dir, "alien.safetensors"))
    return b


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_mismatch_policy(world, alien, kind):
    h = open_host(kind, world)
    try:
        opts = h.shared.opts
        p = h.generate("<qrlora:alien:1>")  # default: warn, with the measured figure, and apply
        text = " ".join(p.comments)
        assert "trained on basis" in text and "differs by" in text and "applied anyway" in text, text
        check_applied(h, world, h.original, {"alien": 1.0})  # applied with the loaded model's basis

        opts.qrlora_mismatch_policy = "refuse"
        p = h.generate("<qrlora:alien:1>")
        assert "refused" in " ".join(p.comments)
        check_original(h, h.original)

        opts.qrlora_mismatch_policy = "apply"
        p = h.generate("<qrlora:alien:0.5>")
        assert not p.comments
        check_applied(h, world, h.original, {"alien": 0.5})

        opts.qrlora_mismatch_policy = "refuse"
        # within the threshold: applied quietly (random tiny layers have tiny spectral gaps, so
        # their bases move a lot; the threshold here is only large enough to cover that)
        opts.qrlora_mismatch_threshold = 1000.0
        p = h.generate("<qrlora:alien:0.25>")
        assert not p.comments
        check_applied(h, world, h.original, {"alien": 0.25})
    finally:
        h.close()


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_basis_from_portable_file_or_cache_without_checkpoint(world, kind, tmp_path):
    # a portable file needs nothing else
    d = deltar.from_basis(world.basis, random_delta_r(world.basis, seed=11, scale=0.2), alpha=4.0, embed_q=True)
    deltar.save(d, os.path.join(world.qrlora_dir, "portable.safetensors"))
    world.files["portable"] = deltar.load(os.path.join(world.qrlora_dir, "portable.safetensors"))
    no_checkpoint = str(tmp_path / "model.ckpt")  # a pickle: never read
    with open(no_checkpoint, "wb") as f:
        f.write(b"\x80\x04\x95 not read")
    cache = str(tmp_path / "basis")
    h = open_host(kind, world, basis_dir=cache, checkpoint=no_checkpoint)
    try:
        p = h.generate("<qrlora:portable:1>")
        assert not p.comments, p.comments
        check_applied(h, world, h.original, {"portable": 1.0})
        # the embedded Q now serves the other files of the same basis too
        p = h.generate("<qrlora:dog:0.5>")
        assert not p.comments, p.comments
        check_applied(h, world, h.original, {"dog": 0.5})
    finally:
        h.close()
    h = open_host(kind, world, basis_dir=cache, checkpoint=no_checkpoint)
    try:
        p = h.generate("<qrlora:dog:1>")  # no basis anywhere, and a pickled checkpoint: refused, clearly
        assert "is not a .safetensors file" in " ".join(p.comments)
        check_original(h, h.original)
        os.makedirs(cache, exist_ok=True)
        save_basis(world.basis, os.path.join(cache, f"{world.basis.basis_id}.safetensors"))
        p = h.generate("<qrlora:dog:1>")  # from the cache folder, by basis id
        assert not p.comments, p.comments
        check_applied(h, world, h.original, {"dog": 1.0})
    finally:
        h.close()


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_files_on_different_bases_are_applied_separately_and_said_so(world, alien, kind):
    h = open_host(kind, world)
    try:
        h.shared.opts.qrlora_mismatch_policy = "apply"
        p = h.generate("<qrlora:dog:0.5> <qrlora:alien:1> <qrlora:style:0.25>")
        text = " ".join(p.comments)
        assert "applied separately, not fused" in text and "dog+style" in text, text
        check_applied(h, world, h.original, {"dog": 0.5, "style": 0.25, "alien": 1.0})
        if kind == "a1111":
            assert sorted(n.name.split("/")[1] for n in h.networks.loaded_networks) == ["alien", "dog+style"]
        else:
            assert len(_qrlora_ids(h.sd_model.forge_objects.unet)) == 2
        h.generate("")
        check_original(h, h.original)
    finally:
        h.close()


def test_one_time_basis_computation_shows_progress_then_is_cached(world, tmp_path, capsys):
    class State:
        seen = []

        def __setattr__(self, key, value):
            State.seen.append((key, value))
            object.__setattr__(self, key, value)

    cache = str(tmp_path / "basis")
    h = open_host("a1111", world, basis_dir=cache)
    try:
        h.shared.state = State()
        h.generate("<qrlora:dog:1>")
        texts = [v for k, v in State.seen if k == "textinfo"]
        assert any(v and "computing basis" in v for v in texts) and texts[-1] is None  # UI status, then cleared
        out = capsys.readouterr().out
        assert "computing the rank-4 basis of" in out and "(100%)" in out  # console
        assert os.path.exists(os.path.join(cache, f"{world.basis.basis_id}.safetensors"))
    finally:
        h.close()
    h = open_host("a1111", world, basis_dir=cache)  # a new session: the cache answers, nothing is computed
    try:
        h.generate("<qrlora:dog:1>")
        assert h.engine.resolver.computations == 0
        check_applied(h, world, h.original, {"dog": 1.0})
    finally:
        h.close()
