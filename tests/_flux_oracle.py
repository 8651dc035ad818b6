"""diffusers' own BFL -> diffusers FLUX converter, usable on tiny models.

``convert_flux_transformer_checkpoint_to_diffusers`` (diffusers 0.42) splits each
``single_blocks.N.linear1`` with ``torch.split(w, (3072, 3072, 3072, 12288))``: the width is a
constant (``inner_dim = 3072``), so it raises on any model that is not full-size. Everything
else it derives or chunks. To keep it as the independent oracle, it runs here with a
``torch`` whose ``split`` scales such hard-coded sizes to the tensor's real length, keeping
their 1:1:1:4 proportions (FLUX's fixed MLP ratio). No other behaviour is changed.
"""

from __future__ import annotations

from unittest import mock

import torch


class _WidthScalingTorch:
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def split(tensor, sizes, dim=0):
        if isinstance(sizes, (list, tuple)) and sum(sizes) != tensor.shape[dim]:
            total, length = sum(sizes), tensor.shape[dim]
            assert all(s * length % total == 0 for s in sizes), (sizes, length)
            sizes = [s * length // total for s in sizes]
        return torch.split(tensor, sizes, dim)


def diffusers_reference(bfl_state_dict: dict) -> dict:
    """The diffusers state dict diffusers' converter makes of a BFL-layout state dict."""
    from diffusers.loaders import single_file_utils

    # The converter pops from (and renames keys in) its argument: give it a copy.
    with mock.patch.object(single_file_utils, "torch", _WidthScalingTorch()):
        return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl_state_dict))
