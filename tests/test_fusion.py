"""Fusion is linear and refuses files that do not share a basis or mask."""

import pytest
import torch

from qrlora import deltar
from qrlora.cli import main
from qrlora.fusion import IncompatibleFiles, fuse
from tests.helpers import synthetic_basis, synthetic_file


def test_fusion_is_linear_in_delta_w():
    basis, _ = synthetic_basis()
    a = synthetic_file(basis, seed=1, alpha=4)
    b = synthetic_file(basis, seed=2, alpha=2)  # a different alpha: fusion must respect each scale
    fused = fuse([("a", a, 1.0), ("b", b, 0.8)])
    for n in basis.names:
        q = basis.q[n]
        expected = 1.0 * a.delta_weight(n, q) + 0.8 * b.delta_weight(n, q)
        assert torch.allclose(fused.delta_weight(n, q), expected, atol=1e-6)
    # λ = 0 and a single file are identities
    assert all(torch.equal(fuse([("a", a, 1.0)]).layers[n], a.layers[n]) for n in basis.names)
    zero = fuse([("a", a, 1.0), ("b", b, 0.0)])
    assert all(torch.allclose(zero.layers[n], a.layers[n]) for n in basis.names)


def test_refuses_different_bases_naming_both():
    basis1, _ = synthetic_basis(seed=0)
    basis2, _ = synthetic_basis(seed=5)
    with pytest.raises(IncompatibleFiles, match=r"cannot fuse dog.safetensors and style.safetensors: different basis"):
        fuse([("dog.safetensors", synthetic_file(basis1), 1), ("style.safetensors", synthetic_file(basis2), 1)])


def test_refuses_different_masks():
    basis, _ = synthetic_basis()
    with pytest.raises(IncompatibleFiles, match=r"cannot fuse a and b: different mask \(triu vs none\)"):
        fuse([("a", synthetic_file(basis, mask="triu"), 1), ("b", synthetic_file(basis, mask="none"), 1)])


def test_fuse_command(tmp_path, capsys):
    basis, _ = synthetic_basis()
    a, b = synthetic_file(basis, seed=1), synthetic_file(basis, seed=2)
    pa, pb, out = (str(tmp_path / n) for n in ("a.safetensors", "b.safetensors", "ab.safetensors"))
    deltar.save(a, pa, torch.float32)
    deltar.save(b, pb, torch.float32)
    assert main(["fuse", f"{pa}:1.0", f"{pb}:0.5", "-o", out, "--dtype", "fp32"]) == 0
    fused = deltar.load(out)
    for n in basis.names:
        assert torch.allclose(fused.layers[n], a.layers[n] + 0.5 * b.layers[n], atol=1e-6)
    assert fused.metadata["ss_output_name"] == "ab"
    other, _ = synthetic_basis(seed=9)
    pc = str(tmp_path / "c.safetensors")
    deltar.save(synthetic_file(other), pc)
    assert main(["fuse", pa, pc, "-o", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot fuse" in err and "a.safetensors" in err and "c.safetensors" in err
    assert not (tmp_path / "bad.safetensors").exists()
