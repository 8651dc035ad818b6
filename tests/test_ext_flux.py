"""FLUX in Forge (ahead of its own issue, to show the design holds): targets that are row
slices of BFL's fused ``qkv`` / ``linear1`` weights become ``(name, (0, start, length))`` patches,
and every slice gets exactly its own ΔW while the rows around it stay as they were."""


import pytest
import torch

from qrlora_ext import keymap
from qrlora import deltar
from qrlora.basis import basis_from_checkpoint
from tests.helpers import random_delta_r
from tests.hosts import models
from tests.hosts.harness import Host


pytestmark = pytest.mark.usefixtures("single_threaded")


def test_forge_flux_row_slices(tiny_flux, tmp_path):
    b = basis_from_checkpoint(tiny_flux.checkpoint, 4)  # flux-official: q/k/v are row slices
    assert any(t.rows for t in b.targets)
    folder = tmp_path / "QRLoRA"
    d = deltar.from_basis(b, random_delta_r(b, seed=3, scale=0.3), alpha=2.0)
    deltar.save(d, str(folder / "subject.safetensors"))
    d = deltar.load(str(folder / "subject.safetensors"))
    h = Host("forge", str(tmp_path), str(folder), basis_dir=str(tmp_path / "basis"))
    try:
        sd = models.forge_flux(tiny_flux.checkpoint)
        h.load_model(sd)
        params = dict(sd.forge_objects_original.unet.model.named_parameters())
        original = {k: v.detach().clone() for k, v in params.items()}
        p = h.generate("<qrlora:subject:0.7>")
        assert not p.comments, p.comments
        keys = [k for ident, patches in sd.forge_objects.unet.lora_patches.items() for k in patches]
        assert keys  # patches were added ...
        slices = [keymap.forge_param(t, "flux") for t in b.targets if t.rows]
        assert all(s.offset == (0, t.rows[0], t.rows[1] - t.rows[0]) for s, t in
                   zip(slices, [t for t in b.targets if t.rows]))
        params = dict(sd.forge_objects_original.unet.model.named_parameters())
        expected = {k: v.double() for k, v in original.items()}
        for t in b.targets:
            fp = keymap.forge_param(t, "flux")
            dw = 0.7 * d.scale * (b.q[t.name].double() @ d.layers[t.name].double())
            if fp.offset:
                expected[fp.name][fp.offset[1]:fp.offset[1] + fp.offset[2]] += dw
            else:
                expected[fp.name] += dw
        for k, v in params.items():
            assert (v.double() - expected[k]).abs().max() <= 1e-6, k
        h.generate("no tags")
        params = dict(sd.forge_objects_original.unet.model.named_parameters())
        assert all(torch.equal(params[k], original[k]) for k in original)
    finally:
        h.close()
