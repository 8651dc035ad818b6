"""File sizes on the real SDXL / FLUX shapes (written for real, zero-valued)."""

import pytest
import torch

from qrlora import archs, deltar
from qrlora.info import describe
from qrlora.qr import SKETCH_PROBES
from qrlora.tiny.real import real_shapes


# FLUX's official set has Σin = Σout, so its ΔR file is half a LoRA plus the header.
@pytest.mark.parametrize("arch,preset,limit", [("sdxl", "sdxl-all", 0.47), ("flux", "flux-official", 0.505)])
def test_delta_r_file_is_under_half_a_same_rank_lora(arch, preset, limit, tmp_path):
    a = archs.get(arch)
    targets = a.select(a.linear_targets(real_shapes(arch)), preset)
    assert len(targets) == {"sdxl": 722, "flux": 342}[arch]
    r = 64
    d = deltar.DeltaR(
        arch=arch, rank=r, alpha=r, mask="triu",
        layers={t.name: torch.zeros(r, t.shape[1]) for t in targets},
        targets={t.name: t for t in targets},
        basis_id=f"{arch}-r64-0000000000000000",
        sketch=torch.zeros(len(targets), SKETCH_PROBES, r),
    )
    path = str(tmp_path / "big.safetensors")
    deltar.save(d, path, dtype=torch.float16)
    info = describe(path)
    lora_params = sum(r * (t.shape[0] + t.shape[1]) for t in targets)
    assert info["equivalent_lora_bytes"] == 2 * lora_params
    print(f"{arch} {preset} r64 fp16: ΔR file {info['size_bytes']:,} B, LoRA {info['equivalent_lora_bytes']:,} B,"
          f" ratio {info['size_vs_lora']:.4f}; trainable {info['trainable_parameters']:,} vs LoRA {lora_params:,}")
    assert info["size_vs_lora"] <= limit
