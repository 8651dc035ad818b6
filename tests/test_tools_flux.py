"""The qrlora tools on FLUX: a basis from every layout FLUX users have, the refusal of fp8
weights, the diffusers and kohya exports loaded into a diffusers FLUX transformer by diffusers'
own loaders, the official trainer's real file, and inspect."""

from __future__ import annotations

import json
import os
import types
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from qrlora import deltar
from qrlora.basis import basis_from_checkpoint, load_basis
from qrlora.cli import main
from qrlora.export import to_diffusers, to_kohya
from tests.helpers import random_delta_r

RANK = 4
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def layouts(tiny_flux, tmp_path_factory):
    """The tiny FLUX's transformer in every layout ``qrlora basis`` reads."""
    from qrlora.tiny.flux import build_components

    root = tmp_path_factory.mktemp("flux-layouts")
    bfl = load_file(tiny_flux.checkpoint)
    out = {"bfl": tiny_flux.checkpoint}
    out["prefixed"] = str(root / "flux1-prefixed.safetensors")
    save_file({PREFIX + k: v for k, v in bfl.items()}, out["prefixed"])
    # ComfyUI's all-in-one: the VAE and both text encoders beside the prefixed transformer
    everything = {PREFIX + k: v for k, v in bfl.items()}
    everything.update({"vae." + k: v for k, v in load_file(tiny_flux.extra_files["vae"]).items()})
    everything.update({"text_encoders.clip_l.transformer." + k: v for k, v in load_file(tiny_flux.extra_files["clip_l"]).items()})
    everything.update({"text_encoders.t5xxl.transformer." + k: v for k, v in load_file(tiny_flux.extra_files["t5"]).items()})
    out["all-in-one"] = str(root / "flux1-aio.safetensors")
    save_file(everything, out["all-in-one"])
    # diffusers: a pipeline folder with a sharded transformer, and a transformer folder alone
    transformer = build_components(0)["transformer"]
    pipe = root / "FLUX.1-tiny"
    transformer.save_pretrained(str(pipe / "transformer"), max_shard_size="200KB")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert len([n for n in os.listdir(pipe / "transformer") if n.endswith(".safetensors")]) > 1
    out["diffusers"] = str(pipe)
    out["transformer-folder"] = str(root / "transformer")
    transformer.save_pretrained(out["transformer-folder"])
    return out


@pytest.mark.parametrize("layout", ["prefixed", "all-in-one", "diffusers", "transformer-folder"])
def test_basis_from_every_flux_layout_is_the_bfl_files_basis(layouts, layout, tmp_path, capsys, single_threaded):
    reference = str(tmp_path / "reference.safetensors")
    assert main(["basis", layouts["bfl"], "--rank", str(RANK), "-o", reference]) == 0
    out = str(tmp_path / f"{layout}.safetensors")
    assert main(["basis", layouts[layout], "--rank", str(RANK), "-o", out]) == 0
    a, b = load_basis(reference), load_basis(out)
    assert b.basis_id == a.basis_id
    assert [t.name for t in b.targets] == [t.name for t in a.targets]
    for name in a.q:
        assert torch.equal(a.q[name], b.q[name]), name


def test_a_diffusers_folder_is_cached_by_its_contents(layouts, tmp_path, capsys, single_threaded):
    cache = str(tmp_path / "cache")
    for expect in ("computed", "cache hit"):
        assert main(["basis", layouts["diffusers"], "--rank", str(RANK), "--cache", cache,
                     "-o", str(tmp_path / "b.safetensors")]) == 0
        assert expect in capsys.readouterr().out


def test_an_fp8_file_is_refused_naming_the_basis_command(layouts, tmp_path, capsys):
    fp8 = str(tmp_path / "flux1-dev-fp8.safetensors")
    bfl = load_file(layouts["bfl"])
    save_file({PREFIX + k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in bfl.items()}, fp8)
    assert main(["basis", fp8, "--rank", "16", "-o", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "flux1-dev-fp8.safetensors: the FLUX.1 weights are stored in F8_E4M3 (8-bit)" in err
    assert "qrlora basis flux1-dev.safetensors --rank 16 -o basis-r16.safetensors" in err
    assert not os.path.exists(tmp_path / "b.safetensors")


def test_a_folder_that_is_no_flux_model_is_one_message(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    assert main(["basis", str(tmp_path), "--rank", "4", "-o", str(tmp_path / "b.safetensors")]) == 2
    assert "not a diffusers model folder this qrlora reads" in capsys.readouterr().err


# ----------------------------------------------------------------- exports in diffusers
@pytest.fixture(scope="module")
def flux_all(tiny_flux):
    """A ΔR file on every block linear (fused qkv, linear1 with its MLP rows, modulation)."""
    b = basis_from_checkpoint(tiny_flux.checkpoint, RANK, targets="flux-all")
    return b, deltar.from_basis(b, random_delta_r(b, seed=5, scale=0.3), alpha=2.0, mask="triu")


def _transformer():
    from qrlora.tiny.flux import build_components

    return build_components(0)["transformer"]


def _native(b, d) -> dict[str, torch.Tensor]:
    """diffusers weight key -> s·Q·(ΔR⊙M): what the core applies."""
    return {name[len("transformer."):] + ".weight": d.delta_weight(name, b.q[name]) for name in d.names}


def _loaded_delta_w(transformer) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA the transformer holds, read back from PEFT's layers after loading."""
    out = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "qr" in module.lora_A:
            a, b = module.lora_A["qr"].weight, module.lora_B["qr"].weight
            out[name + ".weight"] = module.scaling["qr"] * (b @ a)
    return out


def _forward(transformer, seed=0):
    from qrlora.tiny.flux import TRANSFORMER_CONFIG as C

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, C["in_channels"], generator=g),
            encoder_hidden_states=torch.randn(1, 5, C["joint_attention_dim"], generator=g),
            pooled_projections=torch.randn(1, C["pooled_projection_dim"], generator=g),
            timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
            img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
        ).sample


def _merged(b, d):
    transformer = _transformer()
    with torch.no_grad():
        for key, dw in _native(b, d).items():
            transformer.get_parameter(key).add_(dw)
    return transformer


def _check_loaded(transformer, b, d):
    native = _native(b, d)
    loaded = _loaded_delta_w(transformer)
    for key, dw in native.items():
        assert key in loaded, key
        assert torch.allclose(loaded[key], dw, atol=1e-6), key
    for key in set(loaded) - set(native):  # the fused module's rows no target covers
        assert not loaded[key].any(), key
    expected = _forward(_merged(b, d))
    assert (expected - _forward(_transformer())).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(_forward(transformer), expected, atol=1e-5, rtol=1e-4)


def test_diffusers_export_loads_with_flux_pipelines_loader(flux_all, tmp_path, single_threaded):
    from diffusers import FluxPipeline

    b, d = flux_all
    path = str(tmp_path / "dog-diffusers.safetensors")
    tensors, meta = to_diffusers(d, b.q, torch.float32)
    save_file(tensors, path, metadata=meta)
    state_dict = FluxPipeline.lora_state_dict(path)  # what FluxPipeline.load_lora_weights reads
    transformer = _transformer()
    FluxPipeline.load_lora_into_transformer(state_dict, None, transformer=transformer, adapter_name="qr")
    assert len(_loaded_delta_w(transformer)) == len(d.names)
    _check_loaded(transformer, b, d)


def _tiny_width_kohya_converter(hidden: int):
    """diffusers' kohya FLUX converter with the two widths it hard-codes for ``linear1``
    (3072 for q/k/v, 12288 for the MLP: FLUX.1's) set to the tiny model's, and nothing else
    changed: the same code object with those two constants replaced."""
    from diffusers.loaders import lora_conversion_utils as conv

    outer = conv._convert_kohya_flux_lora_to_diffusers
    widths = {3072: hidden, 12288: 4 * hidden}

    def const(c):  # the widths are ints, or a tuple of them the compiler folded the list into
        if isinstance(c, types.CodeType):
            return c.replace(co_consts=tuple(const(x) for x in c.co_consts))
        if isinstance(c, tuple):
            return tuple(const(x) for x in c)
        return widths.get(c, c) if type(c) is int else c

    def retarget(code: types.CodeType) -> types.CodeType:
        return const(code)

    return types.FunctionType(retarget(outer.__code__), outer.__globals__, outer.__name__, outer.__defaults__,
                              outer.__closure__)


def test_kohya_export_loads_through_diffusers_kohya_converter(flux_all, tiny_flux, tmp_path, single_threaded):
    from diffusers import FluxPipeline
    from diffusers.loaders import lora_pipeline
    from qrlora.tiny.flux import TRANSFORMER_CONFIG as C

    b, d = flux_all
    tensors, meta = to_kohya(d, b.q, torch.float32)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in tensors
    path = str(tmp_path / "dog-kohya.safetensors")
    save_file(tensors, path, metadata=meta)
    converter = _tiny_width_kohya_converter(C["num_attention_heads"] * C["attention_head_dim"])
    with mock.patch.object(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", converter):
        state_dict = FluxPipeline.lora_state_dict(path)
    assert all(k.startswith("transformer.") for k in state_dict)
    # the fused modules' block-diagonal up is seen as such: every split keeps rank r
    assert all(v.shape[0] == RANK for k, v in state_dict.items() if k.endswith("lora_A.weight"))
    transformer = _transformer()
    FluxPipeline.load_lora_into_transformer(state_dict, None, transformer=transformer, adapter_name="qr")
    _check_loaded(transformer, b, d)


def test_the_converter_patch_changes_only_the_widths():
    """Unpatched, the converter refuses the tiny model's linear1 on its width alone."""
    from diffusers.loaders import lora_conversion_utils as conv

    hidden, r = 32, 2
    sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4 * r, hidden),
          "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(7 * hidden, 4 * r),
          "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0 * r)}
    with pytest.raises(AssertionError):
        conv._convert_kohya_flux_lora_to_diffusers(dict(sd))
    out = _tiny_width_kohya_converter(hidden)(dict(sd))
    assert {k.rsplit(".", 2)[0] for k in out} == {f"transformer.single_transformer_blocks.0.{m}"
                                                  for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


# ----------------------------------------------------------------- official files, inspect
def _official_layers(transformer) -> list[str]:
    """The layers the official FLUX ΔR trainer wraps: every Linear whose module path contains one
    of its target_modules strings (substring test, as its injection loop does)."""
    targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2")
    return [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and any(t in n for t in targets)]


def test_import_official_of_the_file_flux_pipeline_saves(layouts, tmp_path, capsys, single_threaded):
    """The official trainer hands ``{module path}.lora.{q,delta_r,base_r}.weight`` to
    ``FluxPipeline.save_lora_weights``, which writes them under ``transformer.``: that file,
    written by diffusers itself, imports onto the basis of the BFL file and of the folder."""
    from diffusers import FluxPipeline

    from tests.official_reference import official_qr

    transformer = _transformer()
    g = torch.Generator().manual_seed(7)
    layers, official = {}, {}
    for name in _official_layers(transformer):
        w = transformer.get_submodule(name).weight.detach()
        q, r = official_qr(w, RANK)
        dr = torch.triu(torch.randn(RANK, w.shape[1], generator=g) * 0.1)
        layers.update({f"{name}.lora.q.weight": q, f"{name}.lora.delta_r.weight": dr.bfloat16(),
                       f"{name}.lora.base_r.weight": r.bfloat16()})
        official[name] = q @ dr.bfloat16().float()
    folder = tmp_path / "official"
    FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=layers)
    saved = str(folder / "pytorch_lora_weights.safetensors")
    assert next(iter(load_file(saved))).startswith("transformer.")
    for base in (layouts["bfl"], layouts["diffusers"]):
        out = str(tmp_path / "imported.safetensors")
        assert main(["import-official", saved, "--base", base, "-o", out, "--dtype", "fp32",
                     "--cache", str(tmp_path / "cache")]) == 0
        d = deltar.load(out)
        assert sorted(d.names) == sorted("transformer." + n for n in official)
        b = basis_from_checkpoint(base, RANK, targets=d.names)
        for name, dw in official.items():
            assert torch.allclose(d.delta_weight("transformer." + name, b.q["transformer." + name]), dw, atol=1e-4), name
    assert len(official) == 12 * 2 + 3 * 2  # 12 per double block, q/k/v per single block: 342 at full size
    capsys.readouterr()


def test_inspect_shows_flux_blocks_and_the_same_rank_lora_size(layouts, flux_all, tmp_path, capsys):
    b, d = flux_all
    path = str(tmp_path / "dog.safetensors")
    deltar.save(d, path, torch.float16)
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "double blocks: 2" in text and "single blocks: 2" in text
    lora_bytes = sum(RANK * (t.shape[0] + t.shape[1]) * 2 for t in b.targets)
    assert f"same-rank standard LoRA in F16: {lora_bytes / 1e6:.2f} MB ({lora_bytes:,} bytes)" in text
    assert main(["inspect", layouts["all-in-one"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["arch"], info["double_blocks"], info["single_blocks"]) == ("checkpoint", "flux", 2, 2)
