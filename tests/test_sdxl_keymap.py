"""The SDXL key map (shared/archs/sdxl.py) agrees with diffusers' own single-file converters,
finds exactly the Linear layers the diffusers/transformers models have, and reproduces the
real SDXL target counts from a header-only key/shape map."""

import re

import pytest
import torch
from safetensors.torch import load_file

from qrlora.archs.sdxl import SDXL, TE2_PREFIX, UNET_PREFIX, UNetLayout
from qrlora.tiny.real import CLIP_BIGG, CLIP_L, SDXL_BASE_UNET
from qrlora.tiny.sdxl import UNET_CONFIG, build_components, clip_checkpoint_keys, sgm_state_dict

ARCH = SDXL()

# Other layouts the index arithmetic must handle: SD1.5 (4 levels, conv proj_in, an up block
# without attention first) and a 2-level, 1-res-block UNet.
SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, attention_head_dim=8,
)
SMALL_UNET = dict(
    block_out_channels=[32, 64], cross_attention_dim=32, layers_per_block=1, norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4,
)


@pytest.fixture(scope="module")
def tiny(tiny_sdxl):
    sd = load_file(tiny_sdxl.checkpoint)
    targets = ARCH.linear_targets({k: tuple(v.shape) for k, v in sd.items()})
    return sd, targets, build_components(0)


def _part(targets, prefix):
    chosen = [t for t in targets if t.name.startswith(prefix + ".")]
    assert chosen, prefix
    return chosen


def _sliced(sd, target):
    w = sd[target.key]
    return w if target.rows is None else w[target.rows[0]:target.rows[1]]


# ------------------------------------------------------------------ agreement with diffusers
def test_unet_targets_agree_with_diffusers_converter(tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd, targets, components = tiny
    converted = convert_ldm_unet_checkpoint(sd, components["unet"].config)
    for t in _part(targets, "unet"):
        assert t.rows is None and t.key.startswith(UNET_PREFIX)
        w = converted[t.name[len("unet."):] + ".weight"]
        assert torch.equal(w, sd[t.key]), t
        assert t.shape == tuple(w.shape)


def test_te1_targets_agree_with_diffusers_converter(tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    sd, targets, _ = tiny
    converted = convert_ldm_clip_checkpoint(sd)
    for t in _part(targets, "te1"):
        assert t.rows is None
        w = converted[t.name[len("te1."):] + ".weight"]
        assert torch.equal(w, sd[t.key]) and t.shape == tuple(w.shape), t


def test_te2_targets_agree_with_diffusers_converter(tiny):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sd, targets, components = tiny
    converted = convert_open_clip_checkpoint(components["text_encoder_2"], sd, prefix=TE2_PREFIX)
    te2 = _part(targets, "te2")
    for t in te2:
        w = converted[t.name[len("te2."):] + ".weight"]
        assert torch.equal(w, _sliced(sd, t)) and t.shape == tuple(w.shape), t
    fused = [t for t in te2 if t.rows is not None]
    assert {t.name.rsplit(".", 1)[1] for t in fused} == {"q_proj", "k_proj", "v_proj"}
    assert all(t.key.endswith(".attn.in_proj_weight") for t in fused)


# ------------------------------------------------------------------ the targets are the model's linears
def _transformer_linears(unet):
    """(attention linears, all linears) inside the UNet's transformers, found by module type."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    attn, every = [], []
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            for sub, m in module.named_modules():
                if isinstance(m, torch.nn.Linear):
                    every.append(f"{name}.{sub}")
                if isinstance(m, Attention):
                    attn += [f"{name}.{sub}.{s}" for s, lin in m.named_modules() if isinstance(lin, torch.nn.Linear)]
    return attn, every


def _encoder_linears(text_model):
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    found = []
    for name, module in text_model.named_modules():
        if isinstance(module, CLIPEncoderLayer):
            found += [f"{name}.{sub}" for sub, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    # transformers 5 drops CLIPTextModel's "text_model." level; checkpoints and our names keep it.
    return list(clip_checkpoint_keys(dict.fromkeys(found)))


def test_preset_counts_equal_the_diffusers_models_linears(tiny):
    _, targets, components = tiny
    attn, every = _transformer_linears(components["unet"])
    te = ["te1." + n for n in _encoder_linears(components["text_encoder"])]
    te += ["te2." + n for n in _encoder_linears(components["text_encoder_2"])]

    def names(preset):
        return [t.name for t in ARCH.select(targets, preset)]

    assert len(names("sdxl-attn")) == len(attn) and set(names("sdxl-attn")) == {"unet." + n for n in attn}
    assert len(names("sdxl-all")) == len(every) and set(names("sdxl-all")) == {"unet." + n for n in every}
    assert len(names("sdxl-te")) == len(te) and set(names("sdxl-te")) == set(te)
    assert len(targets) == len(every) + len(te)  # nothing outside the presets
    assert ARCH.default_preset in ARCH.presets


def test_unet_targets_are_in_forward_order(tiny):
    _, targets, components = tiny
    _, every = _transformer_linears(components["unet"])
    # diffusers registers up_blocks before mid_block; within each part named_modules is forward order
    forward = sorted(every, key=lambda n: ["down_blocks", "mid_block", "up_blocks"].index(n.split(".")[0]))
    assert [t.name for t in _part(targets, "unet")] == ["unet." + n for n in forward]
    assert [t.name.split(".")[0] for t in targets] == sorted((t.name.split(".")[0] for t in targets),
                                                             key=["unet", "te1", "te2"].index)


def test_real_sdxl_layout_counts():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    sgm = sgm_state_dict(unet.state_dict(), te1.state_dict(), te2.state_dict())
    targets = ARCH.linear_targets({k: tuple(v.shape) for k, v in sgm.items()})

    counts = {preset: len(ARCH.select(targets, preset)) for preset in ARCH.presets}
    assert counts == {"sdxl-attn": 560, "sdxl-all": 722, "sdxl-te": 264}
    assert len(_part(targets, "te1")) == 72 and len(_part(targets, "te2")) == 192
    # kohya's LoRA parameters per rank, r * (in + out) summed over the targets
    assert sum(t.in_features + t.out_features for t in ARCH.select(targets, "sdxl-all")) == 2_659_840
    assert sum(t.in_features + t.out_features for t in targets) == 3_563_008
    q = next(t for t in targets if t.name == "te2.text_model.encoder.layers.31.self_attn.v_proj")
    assert q.rows == (2560, 3840) and q.shape == (1280, 1280)


# ------------------------------------------------------------------ the whole-UNet map
@pytest.mark.parametrize("config", [UNET_CONFIG, SDXL_BASE_UNET, SD15_UNET, SMALL_UNET],
                         ids=["tiny", "sdxl", "sd15", "small"])
def test_unet_map_is_the_inverse_of_diffusers_converter(config):
    """Every UNet key, not only the linears: diffusers' converter, fed SGM keys from our
    diffusers->SGM map (the values are the diffusers names), must give back each name."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    keys = list(unet.state_dict())
    layout = UNetLayout.from_diffusers_keys(keys)
    sgm = {UNET_PREFIX + layout.to_sgm(k): k for k in keys}
    assert len(sgm) == len(keys)
    assert convert_ldm_unet_checkpoint(sgm, unet.config) == {k: k for k in keys}
    assert UNetLayout.from_sgm_keys(sgm) == layout
    assert all(layout.to_diffusers(s[len(UNET_PREFIX):]) == d for s, d in sgm.items())


def test_unet_layout_of_the_tiny_model(tiny):
    sd, _, _ = tiny
    layout = UNetLayout.from_sgm_keys(sd)
    assert layout == UNetLayout(levels=3, layers_per_block=2, up_attentions=(True, True, False))
    assert layout.to_sgm("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert layout.to_sgm("up_blocks.2.resnets.2.conv_shortcut.weight") == "output_blocks.8.0.skip_connection.weight"
    assert layout.to_sgm("down_blocks.0.downsamplers.0.conv.bias") == "input_blocks.3.0.op.bias"
    assert layout.to_diffusers("middle_block.2.emb_layers.1") == "mid_block.resnets.1.time_emb_proj"
    assert layout.to_diffusers("label_emb.0.2.weight") == "add_embedding.linear_2.weight"
    for bad in ("down_blocks.2.downsamplers.0.conv", "down_blocks.0.attentions.2", "up_blocks.2.attentions.0",
                "up_blocks.2.upsamplers.0.conv", "down_blocks.0.resnets.0.bogus", "nonsense"):
        with pytest.raises(ValueError):
            layout.to_sgm(bad)
    for bad in ("input_blocks.9.0.in_layers.0", "input_blocks.9.0.op", "output_blocks.8.1.conv",
                "output_blocks.5.1.conv", "middle_block.1x", "out.1"):
        with pytest.raises(ValueError):
            layout.to_diffusers(bad)
    with pytest.raises(ValueError):
        UNetLayout.from_sgm_keys(["conditioner.embedders.0.x"])


# ------------------------------------------------------------------ kohya names and detection
def test_kohya_module_names(tiny):
    _, targets, _ = tiny
    by_name = {t.name: t for t in targets}
    u, te = "lora_unet_", "lora_te"
    expected = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            u + "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_out.0":
            u + "input_blocks_8_1_transformer_blocks_1_attn2_to_out_0",
        "unet.mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj":
            u + "middle_block_1_transformer_blocks_1_ff_net_0_proj",
        "unet.up_blocks.1.attentions.2.proj_out": u + "output_blocks_5_1_proj_out",
        "unet.up_blocks.0.attentions.0.proj_in": u + "output_blocks_0_1_proj_in",
        "te1.text_model.encoder.layers.0.self_attn.q_proj": te + "1_text_model_encoder_layers_0_self_attn_q_proj",
        "te2.text_model.encoder.layers.2.mlp.fc2": te + "2_text_model_encoder_layers_2_mlp_fc2",
        "te2.text_model.encoder.layers.1.self_attn.k_proj": te + "2_text_model_encoder_layers_1_self_attn_k_proj",
    }
    for name, module in expected.items():
        t = by_name[name]
        assert ARCH.kohya_module(t) == (module, None, t.out_features)
    modules = [ARCH.kohya_module(t)[0] for t in targets]
    assert len(set(modules)) == len(targets)
    assert all(re.fullmatch(r"lora_(unet|te1|te2)_[a-z0-9_]+", m) for m in modules)


def test_detect(tiny):
    sd, _, _ = tiny
    assert ARCH.detect(set(sd))
    unet_only = {k for k in sd if k.startswith(UNET_PREFIX)}
    assert not ARCH.detect(unet_only)
    assert not ARCH.detect(set())
    assert not ARCH.detect({"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"})  # FLUX
    assert not ARCH.detect({"cond_stage_model.transformer.text_model.final_layer_norm.weight",
                            "model.diffusion_model.input_blocks.0.0.weight"})  # SD1.5
    assert not ARCH.detect({"conditioner.embedders.0.model.ln_final.weight",
                            "model.diffusion_model.input_blocks.0.0.weight"})  # SDXL refiner
