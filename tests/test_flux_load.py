"""FLUX loading (trainer/families/flux_load.py) on the tiny FLUX written in every layout users have."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora.errors import UserError
from qrlora.tiny.flux import build_components
from trainer.families.flux_load import FluxParts, Fp8Linear, load_flux
from trainer.families.flux_tokenizers import tiny_t5_tokenizer

COMPONENTS = {"transformer": "transformer", "vae": "vae", "clip": "text_encoder", "t5": "text_encoder_2"}


def cfg(pretrained, **kw):
    return SimpleNamespace(pretrained=str(pretrained), **kw)


@pytest.fixture(scope="module")
def reference():
    return build_components(0)


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-tokenizer")
    tiny_t5_tokenizer()[0].save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def files(tiny_flux, t5_tokenizer_dir):
    """The separate-file layout: transformer, ae, clip_l, t5xxl, as kohya's arguments name them."""
    return dict(ae=tiny_flux.extra_files["vae"], clip_l=tiny_flux.extra_files["clip_l"],
                t5xxl=tiny_flux.extra_files["t5"], config_dir=tiny_flux.config_dir, t5_tokenizer=t5_tokenizer_dir)


@pytest.fixture(scope="module")
def separate(tiny_flux, files):
    return load_flux(cfg(tiny_flux.checkpoint, **files), "cpu", torch.float32)


def prefixed(path, prefix):
    return {prefix + k: v for k, v in load_file(path).items()}


def all_in_one(tiny_flux, path):
    """ComfyUI's / Forge's checkpoint layout: every component in one file under its prefix."""
    sd = prefixed(tiny_flux.checkpoint, "model.diffusion_model.")
    sd |= prefixed(tiny_flux.extra_files["vae"], "vae.")
    sd |= prefixed(tiny_flux.extra_files["clip_l"], "text_encoders.clip_l.transformer.")
    sd |= prefixed(tiny_flux.extra_files["t5"], "text_encoders.t5xxl.transformer.")
    save_file(sd, path)
    return str(path)


def diffusers_folder(reference, folder, t5_tokenizer_dir):
    for part, sub in COMPONENTS.items():
        reference[sub].save_pretrained(os.path.join(folder, sub))
    shutil.copytree(t5_tokenizer_dir, os.path.join(folder, "tokenizer_2"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "FluxPipeline"}, f)
    return str(folder)


def assert_same_model(parts: FluxParts, reference):
    for part, sub in COMPONENTS.items():
        loaded, expected = getattr(parts, part).state_dict(), reference[sub].state_dict()
        assert loaded.keys() == expected.keys(), (part, set(loaded) ^ set(expected))
        for key, tensor in expected.items():
            assert torch.equal(loaded[key].float(), tensor), (part, key)


def assert_same_base_weights(parts: FluxParts, other: FluxParts):
    targets = parts.info["targets"]
    assert [t.name for t in targets] == [t.name for t in other.info["targets"]]
    for t in targets:
        a, b = parts.base_weight(t.name), other.base_weight(t.name)
        assert a.dtype == b.dtype and a.shape == t.shape and torch.equal(a, b), t.name


def test_separate_files(separate, reference, tiny_flux):
    assert_same_model(separate, reference)
    assert separate.basis_source == tiny_flux.checkpoint and not separate.is_schnell
    assert separate.vae.config.latent_channels == 16
    assert (separate.vae.config.scaling_factor, separate.vae.config.shift_factor) == (0.3611, 0.1159)
    t = separate.info["targets"][2]  # double block 0 to_q: the first rows of img_attn.qkv
    to_q = reference["transformer"].transformer_blocks[0].attn.to_q.weight
    assert t.rows == (0, 32) and torch.equal(separate.base_weight(t.name), to_q)


@pytest.mark.parametrize("layout", ["prefixed", "all-in-one", "diffusers", "builtin"])
def test_every_layout_loads_the_same_weights(layout, tiny_flux, files, separate, reference, tmp_path, t5_tokenizer_dir):
    if layout == "prefixed":
        path = tmp_path / "flux1-dev.safetensors"
        save_file(prefixed(tiny_flux.checkpoint, "model.diffusion_model."), path)
        parts = load_flux(cfg(path, **files), "cpu", torch.float32)
    elif layout == "all-in-one":
        path = all_in_one(tiny_flux, tmp_path / "flux1-dev-aio.safetensors")
        parts = load_flux(cfg(path, config_dir=tiny_flux.config_dir, t5_tokenizer=t5_tokenizer_dir), "cpu", torch.float32)
        assert parts.info["files"]["t5"] == (path, "text_encoders.t5xxl.transformer.")
    elif layout == "diffusers":
        parts = load_flux(cfg(diffusers_folder(reference, tmp_path, t5_tokenizer_dir)), "cpu", torch.float32)
        assert parts.basis_source is None
    else:
        parts = load_flux(cfg("builtin:tiny-flux"), "cpu", torch.float32)
    assert parts.info["layout"] == {"prefixed": "single file", "all-in-one": "all-in-one file",
                                    "diffusers": "diffusers folder", "builtin": "builtin:tiny-flux"}[layout]
    assert_same_model(parts, reference)
    assert_same_base_weights(parts, separate)
    # the same T5 tokenizer (given, the folder's tokenizer_2, the tiny model's own); CLIP's
    # vocabulary except for the built-in model, which always uses its own tiny BPE
    caption = "a photo of a dog"
    assert parts.t5_tokenizer(caption).input_ids == separate.t5_tokenizer(caption).input_ids
    same_clip = parts.clip_tokenizer(caption).input_ids == separate.clip_tokenizer(caption).input_ids
    assert same_clip == (layout != "builtin")


def test_tiny_t5_tokenizer_is_t5_shaped(t5_tokenizer_dir):
    tok, source = tiny_t5_tokenizer()
    batch = tok(["a watercolor painting of a dog", "zq"], padding="max_length", max_length=12, truncation=True)
    assert batch.input_ids[0][-1] == 0 and 1 in batch.input_ids[0]  # </s> = 1, then <pad> = 0
    assert max(max(i) for i in batch.input_ids) < 32128  # fits T5-XXL's vocabulary
    assert tiny_t5_tokenizer()[1] == source  # built the same on every call


def test_missing_t5_and_ae_name_their_keys(tiny_flux, files):
    with pytest.raises(UserError) as e:
        load_flux(cfg(tiny_flux.checkpoint, clip_l=files["clip_l"], config_dir=files["config_dir"]), "cpu", torch.float32)
    message = str(e.value)
    assert "model.t5xxl" in message and "model.ae" in message and "model.clip_l" not in message
    assert "\n" not in message
    with pytest.raises(UserError, match=r"model\.t5xxl: .*nowhere.safetensors does not exist"):
        load_flux(cfg(tiny_flux.checkpoint, **(files | {"t5xxl": "/nowhere.safetensors"})), "cpu", torch.float32)


@pytest.fixture(scope="module")
def fp8_file(tiny_flux, tmp_path_factory):
    """The transformer as fp8 checkpoints ship it: linear weights float8_e4m3fn."""
    sd = load_file(tiny_flux.checkpoint)
    sd = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    path = tmp_path_factory.mktemp("fp8") / "flux1-dev-fp8-e4m3fn.safetensors"
    save_file(sd, path)
    return str(path)


def test_fp8_transformer_without_basis_names_the_command(fp8_file, files):
    with pytest.raises(UserError) as e:
        load_flux(cfg(fp8_file, **files), "cpu", torch.float32, rank=16)
    message = str(e.value)
    assert "qrlora basis flux1-dev.safetensors --rank 16 --targets flux-official -o" in message
    assert "model.basis" in message
    assert fp8_file in message
    # a LoRA baseline needs no basis: it loads
    parts = load_flux(cfg(fp8_file, **files), "cpu", torch.float32, needs_basis=False)
    assert parts.basis_source is None and parts.base_weight(parts.info["targets"][0].name) is None


def test_fp8_transformer_with_a_basis(fp8_file, files, tiny_flux, separate, tmp_path):
    from qrlora.basis import basis_from_checkpoint, save_basis

    # the 16-bit file of the same model: the basis is read from it
    parts = load_flux(cfg(fp8_file, basis=tiny_flux.checkpoint, **files), "cpu", torch.float32)
    assert parts.basis_source == tiny_flux.checkpoint
    assert_same_base_weights(parts, separate)
    # a basis file made by `qrlora basis`
    basis_file = str(tmp_path / "flux-basis.safetensors")
    save_basis(basis_from_checkpoint(tiny_flux.checkpoint, 4), basis_file)
    parts = load_flux(cfg(fp8_file, basis=basis_file, **files), "cpu", torch.float32)
    assert parts.info["basis_file"] == basis_file and parts.basis_source is None
    # a basis never comes from fp8 weights
    with pytest.raises(UserError, match="model.basis: .*fp8"):
        load_flux(cfg(fp8_file, basis=fp8_file, **files), "cpu", torch.float32)


def test_fp8_base_stores_float8_and_computes_in_bf16(tiny_flux, files, separate, tmp_path):
    bf16 = tmp_path / "flux1-dev-bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(tiny_flux.checkpoint).items()}, bf16)
    plain = load_flux(cfg(bf16, **files), "cpu", torch.bfloat16)
    fp8 = load_flux(cfg(bf16, **files), "cpu", torch.bfloat16, fp8_base=True)

    linears = [m for m in fp8.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Fp8Linear and m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert all(p.dtype in (torch.bfloat16, torch.float8_e4m3fn) for p in fp8.transformer.parameters())
    # the basis still comes from the 16-bit file, read before any cast
    assert fp8.basis_source == str(bf16)
    t = fp8.info["targets"][2]
    assert fp8.base_weight(t.name).dtype == torch.bfloat16 and torch.equal(fp8.base_weight(t.name), plain.base_weight(t.name))

    # the same forward as bf16 weights rounded to fp8 (bit for bit), and close to the bf16 forward
    rounded = load_flux(cfg(bf16, **files), "cpu", torch.bfloat16)
    with torch.no_grad():
        for m in rounded.transformer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.to(torch.float8_e4m3fn).to(torch.bfloat16))
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    inputs = {k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in inputs.items()}
    with torch.no_grad():
        out8, out_rounded, out16 = (p.transformer(**inputs).sample.float() for p in (fp8, rounded, plain))
    assert torch.equal(out8, out_rounded)
    assert (out8 - out16).norm() / out16.norm() < 0.1  # e4m3 keeps 3 mantissa bits: ~3 % per weight


def test_fp8_t5_file(tiny_flux, files, separate, tmp_path):
    t5 = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(tiny_flux.extra_files["t5"]).items()}, t5)
    parts = load_flux(cfg(tiny_flux.checkpoint, **(files | {"t5xxl": str(t5)})), "cpu", torch.float32)
    expected = separate.t5.state_dict()
    for key, tensor in parts.t5.state_dict().items():
        assert torch.equal(tensor, expected[key].to(torch.float8_e4m3fn).float()), key


def test_real_configs_read_off_the_shapes():
    """Without model.config_dir, FLUX.1-dev's transformer config comes from its BFL shapes, and
    schnell (no guidance_in) is told from dev."""
    from qrlora.tiny.real import FLUX_DEV_TRANSFORMER, real_shapes
    from trainer.families.flux_load import transformer_config

    shapes = real_shapes("flux")
    config = transformer_config(shapes, None, "flux1-dev.safetensors")
    assert config == FLUX_DEV_TRANSFORMER | {"axes_dims_rope": tuple(FLUX_DEV_TRANSFORMER["axes_dims_rope"])}
    schnell = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    assert transformer_config(schnell, None, "flux1-schnell.safetensors")["guidance_embeds"] is False
    # heads of another width: the rotary axes are unknown, so a config folder is asked for
    narrow = shapes | {"double_blocks.0.img_attn.norm.query_norm.scale": (64,)}
    with pytest.raises(UserError, match="model.config_dir"):
        transformer_config(narrow, None, "other.safetensors")
