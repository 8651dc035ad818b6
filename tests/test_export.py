"""Exports are ordinary LoRAs that real loaders apply exactly like the native ΔR."""

import copy

import pytest
import torch

from qrlora import archs, deltar
from qrlora.basis import basis_from_checkpoint
from qrlora.checkpoint import SafetensorsFile
from qrlora.errors import IncompatibleFiles
from qrlora.export import to_diffusers, to_kohya
from qrlora.tiny.sdxl import UNET_CONFIG, build_components
from tests.helpers import random_delta_r

RANK = 4


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl):
    b = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, targets=["sdxl-all", "sdxl-te"])
    d = deltar.from_basis(b, random_delta_r(b, seed=3, scale=0.3), alpha=2.0, mask="triu")
    return b, d


def _unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cross = UNET_CONFIG["cross_attention_dim"]
    pooled = UNET_CONFIG["projection_class_embeddings_input_dim"] - 6 * UNET_CONFIG["addition_time_embed_dim"]
    return dict(
        sample=torch.randn(1, 4, 16, 16, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 7, cross, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
    )


def _merged_unet(unet, b, d):
    """The native application: W += s·Q·(ΔR⊙M) for every UNet target."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for name in d.names:
            if name.startswith("unet."):
                module = merged.get_submodule(name[len("unet."):])
                module.weight += d.delta_weight(name, b.q[name]).to(module.weight.dtype)
    return merged


def _output(unet):
    with torch.no_grad():
        return unet(**_unet_inputs()).sample


def test_diffusers_export_loads_in_diffusers_and_reproduces_native(sdxl_file):
    b, d = sdxl_file
    unet = build_components(0)["unet"]
    expected = _output(_merged_unet(unet, b, d))
    base = _output(unet)
    tensors, _ = to_diffusers(d, b.q, torch.float32)
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in tensors)
    unet_sd = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    unet.load_lora_adapter(unet_sd, prefix="unet", adapter_name="qr")
    got = _output(unet)
    assert (expected - base).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_kohya_export_is_read_by_diffusers_kohya_converter(sdxl_file):
    """diffusers converts kohya SGM-named SDXL LoRAs on its own; its reading of our names must
    land every layer on the right diffusers module (an independent check of the SGM names)."""
    from diffusers import StableDiffusionXLPipeline

    b, d = sdxl_file
    unet = build_components(0)["unet"]
    expected = _output(_merged_unet(unet, b, d))
    tensors, meta = to_kohya(d, b.q, torch.float32)
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(unet_only, unet_config=unet.config)
    n_unet = sum(1 for n in d.names if n.startswith("unet."))
    assert sum(1 for k in state_dict if k.endswith("down.weight")) == n_unet
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="qr")
    assert sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A.qr")) == n_unet
    assert torch.allclose(_output(unet), expected, atol=1e-5, rtol=1e-4)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_kohya_export_key_format_sdxl(sdxl_file):
    """kohya's SDXL key format (sd-scripts networks/lora.py): lora_unet_ + SGM path,
    lora_te1_/lora_te2_ + HF CLIP path; up = Q, down = ΔR, alpha = s·r."""
    b, d = sdxl_file
    tensors, _ = to_kohya(d, b.q, torch.float32)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(modules) == len(d.names)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj" in modules
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in modules
    arch = archs.get("sdxl")
    for name in d.names:
        module, rows, _ = arch.kohya_module(d.targets[name])
        up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
        alpha = float(tensors[f"{module}.alpha"])
        applied = alpha / down.shape[0] * up @ down
        assert torch.allclose(applied, d.delta_weight(name, b.q[name]), atol=1e-6)


# ----------------------------------------------------------------- FLUX: fused vs split
@pytest.fixture(scope="module")
def flux_file(tiny_flux):
    b = basis_from_checkpoint(tiny_flux.checkpoint, RANK, targets="flux-all")
    d = deltar.from_basis(b, random_delta_r(b, seed=4, scale=0.3), alpha=8.0, mask="none")
    return b, d


def test_flux_bfl_sliced_application_equals_diffusers_split_application(tiny_flux, flux_file):
    from qrlora.tiny.flux import build_components as flux_components
    from tests._flux_oracle import diffusers_reference

    b, d = flux_file
    f = SafetensorsFile(tiny_flux.checkpoint)
    bfl = {k: f.tensor(k).clone() for k in f.keys}
    for name in d.names:  # patch row slices of the fused BFL weights
        t = d.targets[name]
        w = bfl[t.key]
        sl = slice(*t.rows) if t.rows else slice(None)
        w[sl] += d.delta_weight(name, b.q[name]).to(w.dtype)
    from_bfl = diffusers_reference(bfl)
    split = flux_components(0)["transformer"].state_dict()
    for name in d.names:  # patch the split diffusers modules
        key = name[len("transformer."):] + ".weight"
        split[key] = split[key] + d.delta_weight(name, b.q[name])
    assert set(from_bfl) == set(split)
    for key in split:
        assert torch.allclose(from_bfl[key].float(), split[key].float(), atol=1e-6), key


def test_flux_kohya_export_on_fused_weights(tiny_flux, flux_file):
    """One kohya module per fused BFL weight; alpha/rank·up·down equals every slice's ΔW."""
    b, d = flux_file
    tensors, meta = to_kohya(d, b.q, torch.float32)
    f = SafetensorsFile(tiny_flux.checkpoint)
    arch = archs.get("flux")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in tensors
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in tensors
    assert not any("transformer_blocks" in k for k in tensors)
    assert meta["ss_base_model_version"] == "flux1"
    expected: dict[str, torch.Tensor] = {}
    for name in d.names:
        t = d.targets[name]
        module, rows, full_out = arch.kohya_module(t)
        key_shape = f.shape(t.key)
        assert full_out == key_shape[0]
        dw = expected.setdefault(module, torch.zeros(key_shape))
        dw[slice(*rows) if rows else slice(None)] += d.delta_weight(name, b.q[name])
    for module, dw in expected.items():
        up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
        alpha = float(tensors[f"{module}.alpha"])
        assert torch.allclose(alpha / down.shape[0] * up @ down, dw, atol=1e-6), module


def test_flux_diffusers_export_keys(flux_file):
    b, d = flux_file
    tensors, _ = to_diffusers(d, b.q)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in tensors
    assert len(tensors) == 2 * len(d.names)


def test_export_refuses_a_basis_without_the_layers(sdxl_file):
    b, d = sdxl_file
    q = dict(b.q)
    q.pop(d.names[3])
    with pytest.raises(IncompatibleFiles, match=rf"the basis lacks 1 of the {len(d.names)} layers of the ΔR file on basis "
                       rf"{d.basis_id} \(first: {d.names[3]}\)"):
        to_kohya(d, q)
