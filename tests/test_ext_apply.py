"""End to end in both hosts' stand-ins, on module trees of the tiny SGM-layout SDXL with the
hosts' real layer names: ``<qrlora:…>`` tags → exact weights → restored bit-exactly."""

import os
import shutil

import pytest
import torch

from qrlora import deltar
from tests.hosts.world import (check_applied, check_original, make_world, open_host, original_rows, parameters, target_weight,
                               write_file)


pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def world(tiny_sdxl, tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("ext-world")), tiny_sdxl.checkpoint)




@pytest.fixture(params=["a1111", "forge"])
def host(request, world):
    h = open_host(request.param, world)
    yield h
    h.close()


def comments(p):
    return " | ".join(p.comments)


def test_two_tags_fused_exactly_then_restored_bit_exact(host, world):
    p = host.generate("a dog <qrlora:dog:0.7>, watercolor <qrlora:style:-0.4>")
    assert not p.comments, comments(p)
    check_applied(host, world, host.original, {"dog": 0.7, "style": -0.4})
    # one fused group: both files share the basis, so one network / one patch set is applied
    plan_groups = host.adapter.current if host.kind == "a1111" else p.qrlora_plan.groups
    assert len(plan_groups) == 1
    host.generate("a dog, watercolor")
    check_original(host, host.original)


def test_te_and_unet_multipliers(host, world):
    host.generate("<qrlora:dog:0.8:te=0.25> <qrlora:style:0.5:unet=0>")
    for target in world.basis.targets:
        te = target.name.startswith("te")
        weights = {"dog": 0.25, "style": 0.5} if te else {"dog": 0.8, "style": 0.0}
        key, current = target_weight(host, target)
        expected = original_rows(host.original, host, target, key).double() + world.delta_w(weights, target.name)
        assert (current.double() - expected).abs().max() <= 1e-6, target.name


def test_hundred_generations_alternating_tags_and_lambda_do_not_drift(host, world):
    prompts = [
        ("<qrlora:dog:1.0>", {"dog": 1.0}),
        ("<qrlora:dog:0.3> <qrlora:style:0.9>", {"dog": 0.3, "style": 0.9}),
        ("no tags", {}),
        ("<qrlora:style:-1.2>", {"style": -1.2}),
        ("<qrlora:style:0.9> <qrlora:dog:0.3>", {"dog": 0.3, "style": 0.9}),
    ]
    for i in range(100):
        prompt, weights = prompts[i % len(prompts)]
        host.generate(prompt)
        if i % 10 == 9 or i < len(prompts):
            check_applied(host, world, host.original, weights)
    host.generate("nothing")
    check_original(host, host.original)
    engine = host.engine
    assert engine.files.loads == 2  # each file read once
    assert engine.resolver.computations <= 1  # at most the one-time basis computation, never on λ changes


def test_changing_lambda_costs_no_basis_work(host, world):
    host.generate("<qrlora:dog:1>")
    before = host.engine.resolver.computations
    for lam in (0.1, 0.2, 0.3):
        host.generate(f"<qrlora:dog:{lam}>")
        check_applied(host, world, host.original, {"dog": lam})
    assert host.engine.resolver.computations == before


def test_standard_lora_export_gives_the_same_weights(host, world):
    host.generate("<lora:dog_lora:0.7> <lora:style_lora:-0.4>")
    via_lora = parameters(host)
    host.generate("<qrlora:dog:0.7> <qrlora:style:-0.4>")
    via_qrlora = parameters(host)
    for key, value in via_lora.items():
        assert torch.allclose(value, via_qrlora[key], atol=1e-6, rtol=0), key
    check_applied(host, world, host.original, {"dog": 0.7, "style": -0.4})


@pytest.mark.parametrize("prompt", ["<qrlora:dog:0.5> <lora:style_lora:0.6>", "<lora:style_lora:0.6> <qrlora:dog:0.5>"])
def test_coexists_with_lora_tags(host, world, prompt):
    host.generate(prompt)
    check_applied(host, world, host.original, {"dog": 0.5, "style": 0.6})
    host.generate("<lora:style_lora:0.6>")
    check_applied(host, world, host.original, {"style": 0.6})
    host.generate("")
    check_original(host, host.original)


def test_hires_pass_uses_the_hires_prompt_tags(host, world):
    p = host.generate("<qrlora:dog:1>", hr_prompt="<qrlora:style:0.5>")
    check_applied(host, world, host.original, {"style": 0.5})  # the last sampling was the hires pass
    hashes = p.extra_generation_params["QR-LoRA hashes"]
    assert "dog: " in hashes and "style: " in hashes


def test_changed_file_contents_are_reapplied(host, world, tmp_path):
    path = os.path.join(world.qrlora_dir, "dog.safetensors")
    copy = os.path.join(world.qrlora_dir, "pet.safetensors")
    shutil.copy(path, copy)
    try:
        world.files["pet"] = world.files["dog"]
        host.generate("<qrlora:pet:1>")
        check_applied(host, world, host.original, {"pet": 1.0})
        st = os.stat(copy)
        write_file(world, "pet", seed=7, alpha=2.0)  # same name, new contents
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        host.generate("<qrlora:pet:1>")
        check_applied(host, world, host.original, {"pet": 1.0})
    finally:
        os.remove(copy)
        world.files.pop("pet", None)


def test_infotext_hashes_and_no_lora_hash_entry(host, world):
    p = host.generate("<qrlora:dog:1>")
    short = deltar_hash(os.path.join(world.qrlora_dir, "dog.safetensors"))
    assert p.extra_generation_params["QR-LoRA hashes"] == f"dog: {short}"
    assert "Lora hashes" not in p.extra_generation_params


def deltar_hash(path):
    from qrlora.checkpoint import tensor_data_sha256

    return tensor_data_sha256(path)[:12]


# ----------------------------------------------------------------- bad inputs
def _bad_files(world, tmp_path):
    """name -> (prompt, expected message part)."""
    q = world.qrlora_dir
    good = os.path.join(q, "dog.safetensors")
    # a truncated file
    data = open(good, "rb").read()
    with open(os.path.join(q, "bad_truncated.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    # a pickle in disguise, and a .ckpt next to nothing
    with open(os.path.join(q, "bad_pickle.safetensors"), "wb") as f:
        f.write(b"\x80\x04\x95" + b"\x00" * 64)
    with open(os.path.join(q, "oldformat.ckpt"), "wb") as f:
        f.write(b"\x80\x04\x95")
    # wrong architecture and wrong rank in the metadata
    d = world.files["dog"]
    _save_raw(d, os.path.join(q, "bad_arch.safetensors"), {"qrlora.arch": "flux"})
    _save_raw(d, os.path.join(q, "bad_rank.safetensors"), {"qrlora.rank": "8"})
    # a file for another model: every layer twice as wide
    wide_targets = {n: type(t)(t.name, t.key, t.rows, (t.shape[0], 2 * t.shape[1])) for n, t in d.targets.items()}
    wide = deltar.DeltaR("sdxl", d.rank, d.alpha, d.mask, {n: torch.zeros(d.rank, 2 * t.shape[1])
                                                           for n, t in d.targets.items()}, wide_targets,
                         "sdxl-r4-0000000000000000", None, None, {})
    deltar.save(wide, os.path.join(q, "bad_model.safetensors"))
    # a rank the model's layers cannot have (the basis has to be computed: unknown basis id)
    big = 20
    big_d = deltar.DeltaR("sdxl", big, big, "none", {n: torch.ones(big, t.shape[1]) for n, t in d.targets.items()},
                          dict(d.targets), "sdxl-r20-1111111111111111", None, None, {})
    deltar.save(big_d, os.path.join(q, "bad_bigrank.safetensors"))
    return {
        "traversal": ("<qrlora:../../x:1>", "inside the QR-LoRA folder"),
        "absolute": ("<qrlora:/etc/passwd:1>", "inside the QR-LoRA folder"),
        "missing": ("<qrlora:nosuchfile:1>", "no such file"),
        "ckpt": ("<qrlora:oldformat:1>", "only .safetensors files are read"),
        "truncated": ("<qrlora:bad_truncated:1>", "truncated"),
        "pickle": ("<qrlora:bad_pickle:1>", "not a safetensors file"),
        "arch": ("<qrlora:bad_arch:1>", "FLUX.1"),
        "rank": ("<qrlora:bad_rank:1>", "metadata says (8,"),
        "model": ("<qrlora:bad_model:1>", "the file was trained for another model"),
        "bigrank": ("<qrlora:bad_bigrank:1>", "rank 20"),
        "lambda": ("<qrlora:dog:abc>", "is not a number"),
    }


def _save_raw(d, path, override):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    deltar.save(d, tmp)
    with safe_open(tmp, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(override)
    save_file(tensors, path, metadata=meta)
    os.remove(tmp)


def test_each_bad_input_gives_one_message_and_leaves_the_model_untouched(host, world, tmp_path):
    cases = _bad_files(world, tmp_path)
    for case, (prompt, expected) in cases.items():
        p = host.generate(f"a dog {prompt}")
        text = comments(p)
        assert expected in text, f"{case}: {text}"
        assert len(p.comments) == 1, f"{case}: {text}"
        check_original(host, host.original)
    # a bad tag does not stop a good one
    p = host.generate("<qrlora:bad_arch:1> <qrlora:dog:0.5>")
    assert "FLUX.1" in comments(p)
    check_applied(host, world, host.original, {"dog": 0.5})


def test_reserved_options_warn_and_unknown_ones_skip_the_tag(host, world):
    p = host.generate("<qrlora:dog:0.5:lbwe=ATTNDEEPOFF>")
    text = comments(p)
    assert "lbwe=" in text and "not supported" in text
    check_applied(host, world, host.original, {"dog": 0.5})
    p = host.generate("<qrlora:dog:0.5:foo=2> <qrlora:style:0.3>")  # an unknown option: that tag only is skipped
    assert "<qrlora:dog>: unknown option foo=2" in comments(p)
    check_applied(host, world, host.original, {"style": 0.3})


def test_default_lambda_from_settings(host, world):
    host.shared.opts.qrlora_default_multiplier = 0.25
    host.generate("<qrlora:dog>")
    check_applied(host, world, host.original, {"dog": 0.25})


def test_files_qrlora_fuse_would_refuse_are_applied_separately_or_left_out(host, world):
    """The planner groups and refuses as `qrlora fuse` does: a file with another mask is not
    fused (its own group, still exact), a file with alpha 0 is left out with a message."""
    plain = write_file(world, "plain", seed=3, alpha=2.0, mask="none")
    silent = write_file(world, "silent", seed=4, alpha=0.0)
    try:
        p = host.generate("<qrlora:dog:0.5> <qrlora:plain:0.75> <qrlora:silent:1>")
        text = comments(p)
        assert "applied separately, not fused" in text and "mask none" in text, text
        assert "<qrlora:silent> not applied: <qrlora:silent> has alpha 0" in text, text
        check_applied(host, world, host.original, {"dog": 0.5, "plain": 0.75})
        host.generate("")
        check_original(host, host.original)
    finally:
        for path in (plain, silent):
            os.remove(path)
        world.files.pop("plain")
        world.files.pop("silent")
