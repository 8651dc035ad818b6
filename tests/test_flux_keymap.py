"""The FLUX key map (shared/archs/flux.py) against diffusers' converter and the real layout."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from _flux_oracle import diffusers_reference
from qrlora import archs
from qrlora.archs.flux import Flux, checkpoint_prefix, diffusers_to_bfl
from qrlora.tiny.real import FLUX_DEV_TRANSFORMER as REAL_CONFIG

FLUX = Flux()
PREFIX = "model.diffusion_model."

# The official QR-LoRA target_modules, matched as the official scripts do: by substring.
OFFICIAL_MODULES = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")



@pytest.fixture(scope="module")
def bfl(tiny_flux):
    return load_file(tiny_flux.checkpoint)


@pytest.fixture(scope="module")
def tiny_targets(bfl):
    return FLUX.linear_targets({k: v.shape for k, v in bfl.items()})


@pytest.fixture(scope="module")
def tiny_meta_model(tiny_flux):
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(os.path.join(tiny_flux.config_dir, "transformer"))
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


@pytest.fixture(scope="module")
def real_model():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**REAL_CONFIG)


@pytest.fixture(scope="module")
def real_shapes(real_model):
    """Key -> shape of a FLUX.1-dev BFL file, as ComfyUI/Forge all-in-one files prefix it."""
    return {PREFIX + k: tuple(v.shape) for k, v in diffusers_to_bfl(real_model.state_dict()).items()}


def block_linears(model) -> list[str]:
    return [
        "transformer." + name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(BLOCKS)
    ]


# ----------------------------------------------------------------- against diffusers
def test_every_target_is_the_converters_weight(bfl, tiny_targets):
    converted = diffusers_reference(bfl)
    assert tiny_targets
    for t in tiny_targets:
        name = t.name.removeprefix("transformer.")
        for param, key in (("weight", t.key), ("bias", t.key.removesuffix(".weight") + ".bias")):
            fused = bfl[key]
            expected = fused if t.rows is None else fused[t.rows[0]:t.rows[1]]
            assert torch.equal(converted[f"{name}.{param}"], expected), (t.name, param)
        assert tuple(converted[f"{name}.weight"].shape) == t.shape


def test_targets_are_the_block_linears_in_module_order(tiny_targets, tiny_meta_model):
    assert [t.name for t in tiny_targets] == block_linears(tiny_meta_model)


def test_preset_counts_from_modules(tiny_targets, tiny_meta_model):
    linears = block_linears(tiny_meta_model)
    expected = {
        "flux-official": [n for n in linears if any(m in n for m in OFFICIAL_MODULES)],
        "flux-attn": [n for n in linears if ".attn." in n],
        "flux-all": linears,
    }
    assert set(FLUX.presets) == set(expected)
    for preset, names in expected.items():
        assert [t.name for t in FLUX.select(tiny_targets, preset)] == names, preset
    assert FLUX.default_preset == "flux-official"


def test_diffusers_to_bfl_is_the_converters_inverse(bfl):
    assert diffusers_to_bfl(diffusers_reference(bfl)).keys() == bfl.keys()
    for key, tensor in diffusers_to_bfl(diffusers_reference(bfl)).items():
        assert torch.equal(tensor, bfl[key]), key


# ----------------------------------------------------------------- real FLUX.1-dev layout
def test_real_layout_shapes(real_shapes):
    # Widths as listed for Forge's IntegratedFluxTransformer2DModel (forge-lora-internals §3.2).
    expect = {
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.18.txt_attn.proj.weight": (3072, 3072),
        "double_blocks.0.img_mlp.0.weight": (12288, 3072),
        "double_blocks.0.txt_mlp.2.weight": (3072, 12288),
        "double_blocks.0.img_mod.lin.weight": (18432, 3072),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "single_blocks.37.linear1.weight": (21504, 3072),
        "single_blocks.0.linear2.weight": (3072, 15360),
        "single_blocks.0.modulation.lin.weight": (9216, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
        "final_layer.linear.weight": (64, 3072),
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256),
    }
    for key, shape in expect.items():
        assert real_shapes[PREFIX + key] == shape, key


def test_real_layout_counts(real_shapes, real_model):
    targets = FLUX.linear_targets(real_shapes)
    assert [t.name for t in targets] == block_linears(real_model)
    official = FLUX.select(targets, "flux-official")
    assert len(official) == 342
    # The official set's 5.38 B base parameters (qrlora-official-code §2).
    assert round(sum(t.out_features * t.in_features for t in official) / 1e9, 2) == 5.38
    assert len(FLUX.select(targets, "flux-attn")) == 8 * 19 + 3 * 38
    assert len(FLUX.select(targets, "flux-all")) == 14 * 19 + 6 * 38
    # kohya's lora_flux trains 304 fused modules (190 double, 114 single).
    assert len({FLUX.kohya_module(t)[0] for t in targets}) == 304
    assert all(t.key.startswith(PREFIX) for t in targets)


def test_prefix_does_not_change_targets(real_shapes):
    bare = {k.removeprefix(PREFIX): v for k, v in real_shapes.items()}
    prefixed, plain = FLUX.linear_targets(real_shapes), FLUX.linear_targets(bare)
    assert [(t.name, t.rows, t.shape) for t in prefixed] == [(t.name, t.rows, t.shape) for t in plain]
    assert [t.key for t in prefixed] == [PREFIX + t.key for t in plain]
    assert [FLUX.kohya_module(t) for t in prefixed] == [FLUX.kohya_module(t) for t in plain]


# ----------------------------------------------------------------- kohya names
def test_kohya_spot_checks(real_shapes):
    by_name = {t.name: t for t in FLUX.linear_targets(real_shapes)}
    d, s = "transformer.transformer_blocks.", "transformer.single_transformer_blocks."
    cases = {
        d + "0.attn.to_q": ("lora_unet_double_blocks_0_img_attn_qkv", (0, 3072), 9216),
        d + "0.attn.to_k": ("lora_unet_double_blocks_0_img_attn_qkv", (3072, 6144), 9216),
        d + "5.attn.add_v_proj": ("lora_unet_double_blocks_5_txt_attn_qkv", (6144, 9216), 9216),
        d + "0.attn.to_out.0": ("lora_unet_double_blocks_0_img_attn_proj", None, 3072),
        d + "0.attn.to_add_out": ("lora_unet_double_blocks_0_txt_attn_proj", None, 3072),
        d + "0.ff.net.0.proj": ("lora_unet_double_blocks_0_img_mlp_0", None, 12288),
        d + "18.ff_context.net.2": ("lora_unet_double_blocks_18_txt_mlp_2", None, 3072),
        d + "0.norm1.linear": ("lora_unet_double_blocks_0_img_mod_lin", None, 18432),
        d + "0.norm1_context.linear": ("lora_unet_double_blocks_0_txt_mod_lin", None, 18432),
        s + "3.attn.to_v": ("lora_unet_single_blocks_3_linear1", (6144, 9216), 21504),
        s + "3.proj_mlp": ("lora_unet_single_blocks_3_linear1", (9216, 21504), 21504),
        s + "3.proj_out": ("lora_unet_single_blocks_3_linear2", None, 3072),
        s + "37.norm.linear": ("lora_unet_single_blocks_37_modulation_lin", None, 9216),
    }
    for name, expected in cases.items():
        assert FLUX.kohya_module(by_name[name]) == expected, name


@pytest.mark.parametrize("layout", ["tiny", "real"])
def test_kohya_modules_tile_their_weights(layout, bfl, real_shapes):
    shapes = {k: v.shape for k, v in bfl.items()} if layout == "tiny" else real_shapes
    modules: dict[str, list] = {}
    for t in FLUX.linear_targets(shapes):
        name, rows, full = FLUX.kohya_module(t)
        assert full == shapes[t.key][0]
        modules.setdefault(name, []).append((rows or (0, full), full))
    for name, parts in modules.items():
        spans = sorted(rows for rows, _ in parts)
        # The slices of one fused module are disjoint and cover every row, once.
        assert spans[0][0] == 0 and spans[-1][1] == parts[0][1], name
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), name


# ----------------------------------------------------------------- detection and errors
def test_detect(bfl, real_shapes):
    assert FLUX.detect(bfl.keys())
    assert FLUX.detect(real_shapes.keys())
    assert checkpoint_prefix(bfl.keys()) == "" and checkpoint_prefix(real_shapes.keys()) == PREFIX
    # An all-in-one file: transformer, VAE and text encoders side by side.
    aio = set(real_shapes) | {
        "vae.encoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
    }
    assert FLUX.detect(aio)
    sdxl = {
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "first_stage_model.encoder.conv_in.weight",
    }
    assert not FLUX.detect(sdxl)
    assert not FLUX.detect(set())
    # Another prefix is not taken for FLUX's.
    assert not FLUX.detect({"foo." + k for k in bfl})


def test_registered(bfl, real_shapes):
    flux = archs.get("flux")
    assert isinstance(flux, Flux)
    # Through the registry, so no other architecture claims a FLUX file.
    assert archs.detect(bfl.keys()) is flux and archs.detect(real_shapes.keys()) is flux
    assert (flux.name, flux.title, flux.base_model_version) == ("flux", "FLUX.1", "flux1")
    assert flux.modelspec_architecture == "flux-1-dev/lora"
    assert flux.modelspec_implementation == "https://github.com/black-forest-labs/flux"
    assert flux.resolution == "1024x1024"


def test_errors(bfl):
    shapes = {k: tuple(v.shape) for k, v in bfl.items()}
    with pytest.raises(ValueError, match="not a FLUX"):
        FLUX.linear_targets({"input_blocks.0.0.weight": (4, 4, 3, 3)})
    missing = {k: v for k, v in shapes.items() if k != "double_blocks.1.img_mlp.2.weight"}
    with pytest.raises(ValueError, match="lacks double_blocks.1.img_mlp.2.weight"):
        FLUX.linear_targets(missing)
    bad = dict(shapes, **{"single_blocks.0.linear1.weight": (shapes["single_blocks.0.linear1.weight"][0] - 1, 32)})
    with pytest.raises(ValueError, match="linear1"):
        FLUX.linear_targets(bad)
    with pytest.raises(ValueError, match="no BFL name"):
        diffusers_to_bfl({"transformer_blocks.0.attn.unknown.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing row blocks"):
        diffusers_to_bfl({"transformer_blocks.0.attn.to_k.weight": torch.zeros(2, 2)})
