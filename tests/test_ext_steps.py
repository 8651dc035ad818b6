"""Step windows (``start=``/``stop=``, lbw's ``step=FIRST-END``) in both hosts' stand-ins: at
each sampler step every UNet weight is W + Σ over the ACTIVE tags of λᵢ·wᵢ(block)·sᵢ·Q·ΔRᵢ,
text encoders get every tag, weights change only where a window opens or closes, removal is
bit-exact, and bad windows skip only their tag."""

import re
import types

import pytest
import torch

from qrlora_ext import blocks, keymap, syntax
from qrlora_ext.engine import sampling_step
from tests.hosts.world import check_original, make_world, open_host, original_rows, parameters, target_weight

pytestmark = pytest.mark.usefixtures("single_threaded")

IDS12 = blocks.layouts_for("sdxl")[0].ids


@pytest.fixture(scope="module")
def world(tiny_sdxl, tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("ext-steps-world")), tiny_sdxl.checkpoint)


@pytest.fixture(params=["a1111", "forge"])
def host(request, world):
    h = open_host(request.param, world)
    yield h
    h.close()


def check_step(host, world, terms, step, atol=1e-6):
    """terms: (file, λ, {block: weight}, window); the UNet layers get the terms whose window
    holds ``step``, the text encoders every term; nothing else changes."""
    touched = set()
    for target in world.basis.targets:
        key, current = target_weight(host, target)
        touched.add(key)
        expected = original_rows(host.original, host, target, key).double()
        te = keymap.is_text_encoder(target.name)
        block = blocks.block_of("sdxl", target.key)
        for file, lam, weights, (start, stop) in terms:
            d = world.files[file]
            active = te or ((start is None or start <= step) and (stop is None or step < stop))
            if active and target.name in d.layers:
                dw = d.scale * (world.basis.q[target.name].double() @ d.layers[target.name].double())
                expected = expected + lam * weights.get(block, 1.0) * dw
        err = (current.double() - expected).abs().max().item()
        assert err <= atol, f"step {step}, {target.name} ({block}): off by {err:.3g}"
    for key, value in parameters(host).items():
        if key not in touched:
            assert torch.equal(value, host.original[key]), f"step {step}: {key} changed"


def merges(host):
    """How often the host re-merged weights: Forge's LoraLoader refreshes, A1111's networks swaps."""
    if host.kind == "forge":
        return host.sd_model.forge_objects_original.unet.model.lora_loader.merges
    return len({id(n) for n in host.networks.loaded_networks})


DOG = ("dog", 0.8, {}, (2, 5))
STYLE_LBW = [1, 1, 0.5, 2, 1, 0, 1, -1, 1, 1, 0.25, 1]
STYLE = ("style", 0.6, dict(zip(IDS12, STYLE_LBW)), (None, 3))
PROMPT = f"<qrlora:dog:0.8:start=2:stop=5> <qrlora:style:0.6:lbw={','.join(map(str, STYLE_LBW))}:stop=3>"


@pytest.mark.parametrize("second_order", [False, True], ids=["euler", "heun"])
def test_each_step_has_the_active_sum(host, world, second_order):
    seen, identities = [], []

    def on_step(which, i):
        seen.append(i)
        check_step(host, world, [DOG, STYLE], i)
        if host.kind == "forge":
            identities.append(tuple(host.sd_model.forge_objects.unet.lora_patches))
        else:
            identities.append(tuple(n.name for n in host.networks.loaded_networks))

    p = host.generate(PROMPT, steps=7, on_step=on_step, second_order=second_order)
    assert not p.comments, p.comments
    assert sorted(set(seen)) == list(range(7)) and len(seen) == (13 if second_order else 7)
    # one set of weights per window change (steps 0, 2, 3 and 5), none in between
    changes = [i for i, (a, b) in enumerate(zip(identities, identities[1:]), 1) if a != b]
    assert [seen[i] for i in changes] == [2, 3, 5]
    host.generate("nothing")
    check_original(host, host.original)


def test_weights_change_only_at_window_boundaries(host, world):
    host.generate(PROMPT, steps=7)  # every group fused and (A1111) built once
    fusions = host.engine.fuser.fusions
    if host.kind == "forge":
        loader = host.sd_model.forge_objects_original.unet.model.lora_loader
        counts = []
        host.generate(PROMPT, steps=7, on_step=lambda which, i: counts.append(loader.merges))
        # the pass starts merged (step 0's set), then one refresh at steps 2, 3 and 5 each
        assert [b - a for a, b in zip(counts, counts[1:])] == [0, 1, 1, 0, 1, 0]
    else:
        restores = []
        original = host.networks.network_restore_weights_from_backup
        host.networks.network_restore_weights_from_backup = lambda m: (restores.append(m), original(m))
        steps = []
        host.generate(PROMPT, steps=7, on_step=lambda which, i: steps.append(len(restores)))
        host.networks.network_restore_weights_from_backup = original
        # weights are put back and re-merged only during the model calls of steps 2, 3 and 5
        grew = [i for i, (a, b) in enumerate(zip(steps, steps[1:]), 1) if b != a]
        assert grew == [2, 3, 5]
    assert host.engine.fuser.fusions == fusions  # the same prompt again: nothing re-fused


def test_windows_with_a_standard_lora_and_a_late_start(host, world):
    """A tag that starts late applies nothing to the UNet at first; a LoRA tag beside it stays
    applied at every step, whatever our switches do."""
    lora = {}

    def on_step(which, i):
        for target in world.basis.targets:
            if keymap.is_text_encoder(target.name):
                continue
            key, current = target_weight(host, target)
            expected = original_rows(host.original, host, target, key).double() + lora[target.name]
            d = world.files["dog"]
            if i >= 3 and target.name in d.layers:
                expected = expected + 0.5 * d.scale * (world.basis.q[target.name].double() @ d.layers[target.name].double())
            assert (current.double() - expected).abs().max().item() <= 1e-5, (i, target.name)

    host.generate("<lora:style_lora:0.7>")
    for target in world.basis.targets:
        key, current = target_weight(host, target)
        lora[target.name] = current.double() - original_rows(host.original, host, target, key).double()
    p = host.generate("<lora:style_lora:0.7> <qrlora:dog:0.5:start=3>", steps=5, on_step=on_step)
    assert not p.comments, p.comments
    host.generate("nothing")
    check_original(host, host.original)


def test_hires_pass_counts_its_own_steps(host, world):
    """As lbw: each pass applies the windows of its prompt's tags (the hires prompt's in the
    hires pass), counting that pass's steps from 0."""
    done = []

    def on_step(which, i):
        done.append((which, i))
        if which == "first":
            check_step(host, world, [DOG, STYLE], i)
        else:
            check_step(host, world, [("dog", 0.4, {}, (1, 3))], i)

    host.generate(PROMPT, hr_prompt="<qrlora:dog:0.4:step=1-3>", steps=6, hr_steps=4, on_step=on_step)
    assert done[-4:] == [("hires", i) for i in range(4)]


@pytest.mark.parametrize("tag, expected", [
    ("<qrlora:dog:1:start=5:stop=2>", "<qrlora:dog>: stop=2 must be after start=5"),
    ("<qrlora:dog:1:start=-1>", "<qrlora:dog>: start= expects a sampling step (a whole number ≥ 0"),
    ("<qrlora:dog:1:stop=ten>", "<qrlora:dog>: stop= expects a sampling step (a whole number ≥ 0, the first step is 0), not 'ten'"),
    ("<qrlora:dog:1:start=0.5>", "fractions of the steps are not taken"),
    ("<qrlora:dog:1:strat=2>", "<qrlora:dog>: unknown option strat=2 (did you mean start=?)"),
    ("<qrlora:dog:1:step=3>", "<qrlora:dog>: step= expects FIRST-END"),
])
def test_bad_windows_skip_only_their_tag(host, world, tag, expected):
    p = host.generate(f"{tag} <qrlora:style:0.5:stop=2>", steps=3,
                      on_step=lambda which, i: check_step(host, world, [("style", 0.5, {}, (None, 2))], i))
    text = " | ".join(p.comments)
    assert expected in text and len(p.comments) == 1, text


def test_windows_stay_in_infotext_and_paste():
    prompt = "a <qrlora:dog:0.8:start=2:stop=10> b <qrlora:style:0.5:step=0-4>"
    out = syntax.rewrite_prompt(prompt, {"dog": "aaaaaaaaaaaa"}, {"aaaaaaaaaaaa": "pets/dog2"}.get)
    assert out == "a <qrlora:pets/dog2:0.8:start=2:stop=10> b <qrlora:style:0.5:step=0-4>"
    # the prompt (and so the infotext) keeps the tag text; its windows parse back the same
    tags = [syntax.parse_tag(m.split(":")) for m in re.findall(r"<qrlora:([^>]+)>", out)]
    assert [(t.name, t.start, t.stop, t.warnings) for t in tags] == [("pets/dog2", 2, 10, []), ("style", 0, 4, [])]


@pytest.mark.parametrize("calls, steps, total, reported, expected", [
    (0, 20, 20, 0, 0), (1, 20, 20, 0, 1), (7, 20, 20, 6, 7),  # Euler: one call per step
    (0, 20, 40, 0, 0), (1, 20, 40, 0, 0), (2, 20, 40, 0, 1), (37, 20, 40, 17, 18), (38, 20, 40, 18, 19),  # Heun
])
def test_sampling_step_from_the_denoiser(calls, steps, total, reported, expected):
    denoiser = types.SimpleNamespace(step=calls, steps=steps, total_steps=total)
    assert sampling_step(types.SimpleNamespace(sampling_step=reported, denoiser=denoiser)) == expected
    # a host whose denoiser lacks the counts: the step it reports
    assert sampling_step(types.SimpleNamespace(sampling_step=reported, denoiser=None)) == reported


def test_forge_online_patches_switch_too(world):
    """Online LoRA (quantized storage): the stored weights never change, and the weight each
    layer computes with (``get_weight_and_bias``) follows the windows."""
    h = open_host("forge", world)
    from backend.args import dynamic_args
    from backend.operations import get_weight_and_bias

    model = h.sd_model.forge_objects_original.unet.model
    dynamic_args["online_lora"] = True
    model.storage_dtype = "gguf"

    def on_step(which, i):
        check_original(h, h.original)
        for t in world.basis.targets:
            fp = keymap.forge_param(t, "sdxl")
            if fp.component != "unet":
                continue
            weight = get_weight_and_bias(model.get_submodule(fp.name.rsplit(".", 1)[0]))[0]
            original = h.original["unet:" + fp.name]
            if fp.offset:
                weight, original = weight.narrow(*fp.offset), original.narrow(*fp.offset)
            expected = original.double()
            for file, lam, (start, stop) in (("dog", 0.8, (1, 3)), ("style", -0.5, (2, None))):
                d = world.files[file]
                if start <= i and (stop is None or i < stop) and t.name in d.layers:
                    expected = expected + lam * d.scale * (world.basis.q[t.name].double() @ d.layers[t.name].double())
            assert (weight.double() - expected).abs().max().item() <= 1e-5, (i, t.name)

    try:
        p = h.generate("<qrlora:dog:0.8:start=1:stop=3> <qrlora:style:-0.5:start=2>", steps=4, on_step=on_step)
        assert not p.comments, p.comments
    finally:
        dynamic_args["online_lora"] = False
        model.storage_dtype = torch.float32
        h.close()


def test_forge_windows_switch_when_a_later_script_clones_the_unet(world):
    """Scripts after ours (ControlNet, FreeU, …) may sample with their own clone of our patcher
    (``process_before_every_sampling``: ``unet = forge_objects.unet.clone()``); the windows still
    switch on the patcher that samples."""
    h = open_host("forge", world)
    runner = h.runner
    ours = runner.process_before_every_sampling

    def with_a_later_script(p, **kwargs):
        ours(p, **kwargs)
        p.sd_model.forge_objects.unet = p.sd_model.forge_objects.unet.clone()

    runner.process_before_every_sampling = with_a_later_script
    try:
        p = h.generate(PROMPT, steps=6, on_step=lambda which, i: check_step(h, world, [DOG, STYLE], i))
        assert not p.comments, p.comments
        h.generate("nothing")
        check_original(h, h.original)
    finally:
        h.close()
