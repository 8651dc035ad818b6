"""shared/tiny/vae.py: the exact inverse of diffusers' convert_ldm_vae_checkpoint."""

from __future__ import annotations

import pytest
import torch

from qrlora.tiny.vae import vae_diffusers_to_ldm


@pytest.mark.parametrize("quant_convs", [True, False])
@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_round_trip(quant_convs, prefix):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = dict(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,  # decoder blocks get 3 resnets: block indices past the encoder's
        norm_num_groups=4,
        latent_channels=4,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(**config)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p))  # no two tensors alike (norms start at 1, biases at 0)
    sd = vae.state_dict()
    ldm = vae_diffusers_to_ldm(sd)

    assert ("quant_conv.weight" in ldm) == quant_convs and ("post_quant_conv.weight" in ldm) == quant_convs
    for key in (
        "encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight", "encoder.mid.block_2.norm1.weight", "encoder.norm_out.bias",
        "decoder.up.0.block.2.conv1.weight", "decoder.up.2.upsample.conv.weight", "decoder.mid.attn_1.norm.weight",
    ):
        assert key in ldm, key
    assert "decoder.up.0.upsample.conv.weight" not in ldm  # the last-run (full-resolution) block has no upsampler
    # Decoder blocks are numbered in reverse: diffusers' first up block is LDM's last.
    assert torch.equal(ldm["decoder.up.2.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    for name in ("q", "k", "v", "proj_out"):
        assert ldm[f"encoder.mid.attn_1.{name}.weight"].shape == (16, 16, 1, 1)

    back = convert_ldm_vae_checkpoint({prefix + k: v for k, v in ldm.items()}, config)
    assert back.keys() == sd.keys()
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor), key


def test_unknown_key_raises():
    with pytest.raises(ValueError, match="no LDM name"):
        vae_diffusers_to_ldm({"encoder.something_new.weight": torch.zeros(1)})
