"""Importing files written by the official QR-LoRA code (FLUX layout, as it saves them)."""

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from qrlora import deltar
from qrlora.basis import basis_from_checkpoint
from qrlora.checkpoint import FileFormatError, SafetensorsFile
from qrlora.errors import IncompatibleFiles
from qrlora.cli import main
from qrlora.official import import_official
from tests.official_reference import official_qr

RANK = 4


def write_official(path, tiny_flux, basis, seed=0, tamper=None, bf16=False):
    """An official-format file: per layer Q and R from the official maths (unnormalised signs),
    and a trained-looking ΔR with the triu mask. ``tamper`` names a layer whose stored Q is made
    from other weights (what a different base model would give); ``bf16``: every Q is computed
    from the weights rounded to bf16, as the official trainer does."""
    f = SafetensorsFile(tiny_flux.checkpoint)
    g = torch.Generator().manual_seed(seed)
    tensors, official = {}, {}
    for t in basis.targets:
        w = f.tensor(t.key)[slice(*t.rows) if t.rows else slice(None)].float()
        if t.name == tamper:
            w = torch.randn(w.shape, generator=g)
        if bf16:
            w = w.bfloat16().float()
        q, r = official_qr(w, RANK)
        dr = torch.triu(torch.randn(RANK, t.shape[1], generator=g) * 0.1)
        tensors[f"{t.name}.lora.q.weight"] = q
        tensors[f"{t.name}.lora.delta_r.weight"] = dr
        tensors[f"{t.name}.lora.base_r.weight"] = r
        official[t.name] = (q, dr)
    save_file(tensors, path, metadata={"format": "pt"})
    return official


@pytest.fixture(scope="module")
def flux_basis(tiny_flux):
    return basis_from_checkpoint(tiny_flux.checkpoint, RANK, targets="flux-official")


def test_import_keeps_delta_w_and_aligns_signs(tiny_flux, flux_basis, tmp_path):
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    official = write_official(path, tiny_flux, flux_basis)
    d, report = import_official(path, flux_basis)
    assert report.mask == "triu" and d.mask == "triu"
    assert not report.mismatched
    assert sum(x.flipped for x in report.layers) > 0  # LAPACK's signs are not canonical
    for name, (q_off, dr_off) in official.items():
        assert torch.allclose(d.delta_weight(name, flux_basis.q[name]), q_off @ dr_off, atol=1e-5), name
    assert max(x.dw_error for x in report.layers) < 1e-4  # fp32 SVD vs fp32 eigh: ~2e-5
    assert d.basis_id == flux_basis.basis_id and d.alpha == RANK  # official scale is 1


def test_layers_whose_delta_w_moves_stop_the_import_unless_forced(tiny_flux, flux_basis, tmp_path):
    path = str(tmp_path / "other_base.safetensors")
    bad = "transformer.transformer_blocks.1.ff.net.2"
    write_official(path, tiny_flux, flux_basis, tamper=bad)
    with pytest.raises(IncompatibleFiles, match=rf"more than 2% in 1 of \d+ layers \({re.escape(bad)} \("):
        import_official(path, flux_basis)
    d, report = import_official(path, flux_basis, force=True)
    assert [x.name for x in report.mismatched] == [x.name for x in report.moved] == [bad]
    assert bad in report.summary()
    assert report.mask == d.mask == "triu"  # one projected layer does not change the whole file's mask


def test_official_q_from_bf16_weights_imports_with_the_least_delta_w_error(tiny_flux, flux_basis, tmp_path):
    """The official trainer computes Q from bf16 weights: 1-2 % from ours. Every layer gets the
    ΔR whose ΔW is closest to the official one under the file's mask (the mask applied to the
    projection), never the plain re-signed ΔR, and the mask stays triu."""
    path = str(tmp_path / "bf16.safetensors")
    official = write_official(path, tiny_flux, flux_basis, bf16=True)
    d, report = import_official(path, flux_basis)
    assert d.mask == report.mask == "triu"
    by_name = {x.name: x for x in report.layers}
    assert max(x.q_error for x in report.layers) > 0.005  # really another basis
    for name, (q_off, dr_off) in official.items():
        q = flux_basis.q[name]
        target = q_off @ dr_off
        best = torch.triu(q.T @ q_off @ dr_off)  # least squares under the triu constraint
        signs = torch.where(torch.diagonal(q.T @ q_off) < 0, -1.0, 1.0)
        resigned = signs[:, None] * dr_off
        err = lambda dr: float((q @ dr - target).norm() / target.norm())  # noqa: E731
        got = err(d.layers[name].float())
        assert got <= err(best) * (1 + 1e-3) + 1e-6, name
        assert got <= err(resigned) + 1e-6, name
        assert abs(by_name[name].dw_error - got) < 1e-3 * max(got, 1e-4), name


def test_cli_import_then_apply(tiny_flux, tmp_path, capsys):
    path = str(tmp_path / "official.safetensors")
    b = basis_from_checkpoint(tiny_flux.checkpoint, RANK, targets="flux-official")
    official = write_official(path, tiny_flux, b)
    out = str(tmp_path / "imported.safetensors")
    code = main(["import-official", path, "--base", tiny_flux.checkpoint, "--cache", str(tmp_path / "cache"),
                 "-o", out, "--dtype", "fp32"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "layers imported, mask triu" in text
    d = deltar.load(out)
    name = next(iter(official))
    q_off, dr_off = official[name]
    assert torch.allclose(d.delta_weight(name, b.q[name]), q_off @ dr_off, atol=1e-5)


def test_bad_official_files(tmp_path, flux_basis):
    wrong = str(tmp_path / "wrong.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(FileFormatError, match="not an official QR-LoRA ΔR file"):
        import_official(wrong, flux_basis)
    missing_q = str(tmp_path / "missing_q.safetensors")
    name = flux_basis.targets[0].name
    save_file({f"{name}.lora.delta_r.weight": torch.zeros(RANK, flux_basis.targets[0].shape[1])}, missing_q)
    with pytest.raises(FileFormatError, match=f"layer {name} has no q tensor"):
        import_official(missing_q, flux_basis)
    unknown = str(tmp_path / "unknown.safetensors")
    save_file({"transformer.nope.lora.q.weight": torch.zeros(3, RANK),
               "transformer.nope.lora.delta_r.weight": torch.zeros(RANK, 3)}, unknown)
    with pytest.raises(FileFormatError, match="layers are not in the basis"):
        import_official(unknown, flux_basis)


def test_cli_refuses_a_moved_layer_and_writes_with_force(tiny_flux, flux_basis, tmp_path, capsys):
    path = str(tmp_path / "other_base.safetensors")
    bad = "transformer.transformer_blocks.1.ff.net.2"
    write_official(path, tiny_flux, flux_basis, tamper=bad)
    out = str(tmp_path / "imported.safetensors")
    common = ["import-official", path, "--base", tiny_flux.checkpoint, "--cache", str(tmp_path / "cache"), "-o", out]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert bad in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)
    assert main(common + ["--force"]) == 0
    assert bad in capsys.readouterr().out and deltar.load(out).mask == "triu"


def _import_figures(tiny_flux, flux_basis, tmp_path):
    """For the report: dW error per layer of the import vs plain re-signing, bf16 official Q."""
    path = str(tmp_path / "bf16.safetensors")
    official = write_official(path, tiny_flux, flux_basis, bf16=True)
    _, report = import_official(path, flux_basis)
    rows = []
    for x in report.layers:
        q_off, dr_off = official[x.name]
        q = flux_basis.q[x.name]
        signs = torch.where(torch.diagonal(q.T @ q_off) < 0, -1.0, 1.0)
        resign = float((q @ (signs[:, None] * dr_off) - q_off @ dr_off).norm() / (q_off @ dr_off).norm())
        rows.append((x.q_error, resign, x.dw_error))
    return rows
