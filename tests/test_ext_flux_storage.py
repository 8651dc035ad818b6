"""<qrlora:…> on Forge's FLUX in every storage Forge loads it in (bf16, fp8 e4m3fn/e5m2, nf4/fp4,
GGUF Q8_0/Q4_0/Q4_K), through Forge's own patch mechanism (the stand-ins in tests/hosts/forge
reproduce ``LoraLoader.refresh``'s dequantize / merge / re-quantize and the online path), with
the basis found by identity when the loaded file is quantized, and every bad input refused with
a message and the model untouched."""

import os

import pytest
import torch

from qrlora import deltar
from qrlora.basis import basis_from_checkpoint, save_basis
from qrlora.checkpoint import SafetensorsFile, save_atomic
from qrlora_ext import keymap
from tests.helpers import random_delta_r
from tests.hosts import models
from tests.hosts.harness import Host

pytestmark = pytest.mark.usefixtures("single_threaded")
RANK = 4
# ||(W_after − W_before) − ΔW|| / ||ΔW|| allowed per storage: two roundings of W + ΔW, with ΔW
# about as large as W; a patch on the wrong rows or with the wrong scale is off by ≥ 100 %.
TOLERANCE = {"bfloat16": 0.02, "float8_e4m3fn": 0.15, "float8_e5m2": 0.3, "nf4": 0.4, "fp4": 0.5,
             "gguf:Q8_0": 0.03, "gguf:Q4_0": 0.4}


@pytest.fixture(scope="module")
def flux(tiny_flux, tmp_path_factory):
    """The 16-bit original, its basis made once (``qrlora basis``), a ΔR file on it, and the
    quantized copies a user loads in Forge (the file names and stored dtypes are what counts)."""
    root = tmp_path_factory.mktemp("flux-storage")
    basis = basis_from_checkpoint(tiny_flux.checkpoint, RANK, "flux-official")
    folder = root / "QRLoRA"
    d = deltar.from_basis(basis, random_delta_r(basis, seed=3, scale=3.0), alpha=float(RANK))
    deltar.save(d, str(folder / "subject.safetensors"))
    f = SafetensorsFile(tiny_flux.checkpoint)
    files = {}
    for kind, dtype in (("fp8", torch.float8_e4m3fn), ("nf4", torch.uint8)):
        tensors = {k: (f.tensor(k).to(dtype) if f.tensor(k).dim() == 2 else f.tensor(k)) for k in f.keys}
        files[kind] = str(root / f"flux1-dev-{kind}.safetensors")
        save_atomic(tensors, files[kind], {})
    files["gguf"] = str(root / "flux1-dev-Q8_0.gguf")  # never opened: a .gguf is quantized by definition
    return {"root": root, "basis": basis, "folder": folder, "d": deltar.load(str(folder / "subject.safetensors")),
            "files": files, "checkpoint": tiny_flux.checkpoint}


def _host(flux, tmp_path, basis=True):
    basis_dir = tmp_path / "basis"
    if basis:
        save_basis(flux["basis"], str(basis_dir / "flux1-dev-r4.safetensors"))
    return Host("forge", str(tmp_path), str(flux["folder"]), basis_dir=str(basis_dir))


def _file_for(flux, storage):
    if storage in ("float32", "bfloat16"):
        return flux["checkpoint"]
    return flux["files"]["gguf" if storage.startswith("gguf") else "nf4" if storage in ("nf4", "fp4") else "fp8"]


def _model(flux, storage):
    sd = models.forge_flux(flux["checkpoint"], storage=storage)
    sd.sd_checkpoint_info.filename = sd.filename = _file_for(flux, storage)
    return sd


def _raw(sd):
    """Every stored tensor as stored (bytes of GGUF/4-bit weights included)."""
    return {k: v.detach().clone() for k, v in sd.forge_objects_original.unet.model.named_parameters()}


def _dequantized(sd):
    from backend.operations import get_weight_and_bias

    model = sd.forge_objects_original.unet.model
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "weight", None) is not None and len(_shape(module.weight)) == 2:
            out[name + ".weight"] = get_weight_and_bias(module, torch.float32)[0].double()
    return out


def _shape(w):
    state = getattr(w, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(w.shape)


def _expected_delta(flux, lam):
    """Parameter name -> ΔW over the whole fused weight (zero rows outside the targets' slices)."""
    d, b = flux["d"], flux["basis"]
    out = {}
    for t in b.targets:
        fp = keymap.forge_param(t, "flux")
        dw = lam * d.scale * (b.q[t.name].double() @ d.layers[t.name].double())
        full = out.setdefault(fp.name, None)
        if full is None:
            rows = t.rows[1] if t.rows else dw.shape[0]
            full = out[fp.name] = torch.zeros(max(rows, 1), dw.shape[1], dtype=torch.float64)
        if fp.offset:
            if full.shape[0] < fp.offset[1] + fp.offset[2]:
                full = out[fp.name] = torch.cat([full, torch.zeros(fp.offset[1] + fp.offset[2] - full.shape[0], full.shape[1], dtype=full.dtype)])
            full[fp.offset[1]:fp.offset[1] + fp.offset[2]] += dw
        else:
            full += dw
    return out


def _check_applied(before, after, expected, tolerance):
    for name, dw in expected.items():
        got = after[name][: dw.shape[0]] - before[name][: dw.shape[0]]
        err = float((got - dw).norm() / dw.norm())
        assert err <= tolerance, f"{name}: ΔW off by {err:.1%}"


@pytest.mark.parametrize("storage", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "nf4", "fp4", "gguf:Q8_0", "gguf:Q4_0"])
def test_offline_merge_in_every_storage(flux, tmp_path, storage, monkeypatch):
    if storage in ("nf4", "fp4"):  # Forge re-quantizes 4-bit weights through .cuda()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    h = _host(flux, tmp_path)
    try:
        sd = _model(flux, storage)
        h.load_model(sd)
        raw, before = _raw(sd), _dequantized(sd)
        p = h.generate("<qrlora:subject:0.7>")
        assert not p.comments, p.comments
        assert sd.forge_objects_original.unet.model.lora_loader.backup  # Forge's offline merge ran
        after = _dequantized(sd)
        expected = _expected_delta(flux, 0.7)
        _check_applied(before, after, expected, TOLERANCE[storage])
        for name in set(before) - set(expected):
            assert torch.equal(after[name], before[name]), f"{name} changed"
        h.generate("no tags")
        restored = _raw(sd)
        assert all(torch.equal(restored[k], raw[k]) for k in raw), "not restored bit-exactly"
    finally:
        h.close()


@pytest.mark.parametrize("storage", ["gguf:Q4_K", "nf4", "float8_e4m3fn"])
def test_online_lora_in_quantized_storage(flux, tmp_path, storage):
    """'(fp16 LoRA)' in 'Diffusion in Low Bits': the weights stay as stored and each forward
    merges ΔW into the dequantized weight (backend/operations.py get_weight_and_bias)."""
    h = _host(flux, tmp_path)
    try:
        from backend.args import dynamic_args

        dynamic_args["online_lora"] = True
        sd = _model(flux, storage)
        h.load_model(sd)
        raw = _raw(sd)
        from backend.operations_bnb import functional_dequantize_4bit
        from backend.operations_gguf import dequantize_tensor

        def plain(module):
            w = module.weight
            w = functional_dequantize_4bit(w) if getattr(w, "bnb_quantized", False) else dequantize_tensor(w)
            return w.double()

        model = sd.forge_objects_original.unet.model
        before = {n + ".weight": plain(m) for n, m in model.named_modules() if getattr(m, "weight", None) is not None}
        p = h.generate("<qrlora:subject:0.7>")
        assert not p.comments, p.comments
        assert all(torch.equal(v, raw[k]) for k, v in _raw(sd).items())  # nothing merged into storage
        after = _dequantized(sd)
        _check_applied(before, after, _expected_delta(flux, 0.7), 0.01)  # fp16/bf16 computation of ΔW
    finally:
        dynamic_args["online_lora"] = False
        h.close()


def test_gguf_type_forge_cannot_requantize(flux, tmp_path):
    h = _host(flux, tmp_path)
    try:
        sd = _model(flux, "gguf:Q4_K")
        h.load_model(sd)
        raw = _raw(sd)
        p = h.generate("<qrlora:subject:0.7>")  # Forge's own LoRA would raise NotImplementedError here
        text = " ".join(p.comments)
        assert "Q4_K" in text and "Automatic (fp16 LoRA)" in text and "untouched" in text, text
        assert not any(sd.forge_objects.unet.lora_patches.values())
        assert all(torch.equal(v, raw[k]) for k, v in _raw(sd).items())
    finally:
        h.close()


def test_no_basis_for_a_quantized_file_names_the_command(flux, tmp_path):
    h = _host(flux, tmp_path, basis=False)
    try:
        sd = _model(flux, "float8_e4m3fn")
        h.load_model(sd)
        raw = _raw(sd)
        p = h.generate("<qrlora:subject:1>")
        text = " ".join(p.comments)
        assert "never computed from quantized weights" in text, text
        assert "qrlora basis" in text and "--rank 4" in text and "--targets flux-official" in text, text
        assert flux["d"].basis_id in text and "flux1-dev-fp8" in text, text
        assert h.engine.resolver.computations == 0
        assert not any(sd.forge_objects.unet.lora_patches.values())
        assert all(torch.equal(v, raw[k]) for k, v in _raw(sd).items())
    finally:
        h.close()


def test_identity_rejects_another_model(flux, tmp_path, tiny_flux):
    """A quantized model of other weights (same shapes) is measured as another model: the
    policy decides, as for a checkpoint whose basis differs."""
    from qrlora.tiny import make_tiny

    other = make_tiny("flux", str(tmp_path / "other"), seed=5)
    h = _host(flux, tmp_path)
    try:
        sd = models.forge_flux(other.checkpoint, storage="float8_e4m3fn")
        sd.sd_checkpoint_info.filename = sd.filename = flux["files"]["fp8"]
        h.load_model(sd)
        raw = _raw(sd)
        p = h.generate("<qrlora:subject:1>")
        text = " ".join(p.comments)
        assert "is not the model basis" in text and "rounding allows 6%" in text, text
        h.shared.opts.qrlora_mismatch_policy = "refuse"
        h.generate("no tags")
        p = h.generate("<qrlora:subject:1>")
        assert "refused" in " ".join(p.comments)
        assert all(torch.equal(v, raw[k]) for k, v in _raw(sd).items())
    finally:
        h.close()


def test_measured_mismatch_policy_on_a_quantized_model(flux, tmp_path, tiny_flux):
    """A ΔR trained on another basis, applied to a quantized model whose own basis is found by
    identity: the two bases are measured and the policy applies as for SDXL."""
    from qrlora.tiny import make_tiny

    other = make_tiny("flux", str(tmp_path / "other"), seed=5)
    ob = basis_from_checkpoint(other.checkpoint, RANK, "flux-official")
    foreign = deltar.from_basis(ob, random_delta_r(ob, seed=4), alpha=float(RANK))
    deltar.save(foreign, str(tmp_path / "QRLoRA2" / "foreign.safetensors"))
    basis_dir = tmp_path / "basis"
    save_basis(flux["basis"], str(basis_dir / "flux1-dev-r4.safetensors"))
    h = Host("forge", str(tmp_path), str(tmp_path / "QRLoRA2"), basis_dir=str(basis_dir))
    try:
        sd = _model(flux, "gguf:Q8_0")
        h.load_model(sd)
        p = h.generate("<qrlora:foreign:1>")
        text = " ".join(p.comments)
        assert f"trained on basis {ob.basis_id}" in text and flux["basis"].basis_id in text, text
        assert "applied anyway" in text
        h.shared.opts.qrlora_mismatch_policy = "refuse"
        p = h.generate("<qrlora:foreign:1>")
        assert "refused" in " ".join(p.comments)
    finally:
        h.close()


def test_sdxl_file_on_flux_and_flux_file_on_sdxl(flux, tmp_path, tiny_sdxl):
    sdxl_basis = basis_from_checkpoint(tiny_sdxl.checkpoint, RANK, "sdxl-attn")
    deltar.save(deltar.from_basis(sdxl_basis, random_delta_r(sdxl_basis), alpha=4.0),
                str(flux["folder"] / "xl.safetensors"))
    h = _host(flux, tmp_path)
    try:
        sd = _model(flux, "float8_e4m3fn")
        h.load_model(sd)
        raw = _raw(sd)
        text = " ".join(h.generate("<qrlora:xl:1>").comments)
        assert "trained for SDXL" in text and "FLUX.1" in text and "nothing was changed" in text, text
        assert all(torch.equal(v, raw[k]) for k, v in _raw(sd).items())
        sdxl = models.forge_sdxl(tiny_sdxl.checkpoint)
        h.load_model(sdxl)
        text = " ".join(h.generate("<qrlora:subject:1>").comments)
        assert "trained for FLUX.1" in text and "SDXL" in text, text
        assert not any(sdxl.forge_objects.unet.lora_patches.values())
    finally:
        h.close()
        os.remove(flux["folder"] / "xl.safetensors")


def test_a1111_refuses_a_flux_file(flux, tmp_path, tiny_sdxl):
    h = Host("a1111", str(tmp_path), str(flux["folder"]), basis_dir=str(tmp_path / "basis"))
    try:
        sd = models.a1111_sdxl(tiny_sdxl.checkpoint)
        h.load_model(sd)
        before = {k: v.clone() for k, v in sd.state_dict().items()}
        p = h.generate("<qrlora:subject:1>")
        text = " ".join(p.comments)
        assert "FLUX.1 file" in text and "Automatic1111 cannot run FLUX.1" in text, text
        assert all(torch.equal(v, before[k]) for k, v in sd.state_dict().items())
    finally:
        h.close()
