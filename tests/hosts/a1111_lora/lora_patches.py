"""Stand-in of A1111 v1.10 extensions-builtin/Lora/lora_patches.py + the ``network_*_forward``
functions of networks.py: ``LoraPatches()`` replaces ``forward`` and ``_load_from_state_dict``
of ``torch.nn.Linear``, ``Conv2d``, ``GroupNorm``, ``LayerNorm`` and ``MultiheadAttention``
(keeping the originals); each patched forward calls ``network_apply_weights(self)`` (or
``network_forward`` when ``opts.lora_functional``) before the original; ``undo()`` puts the
originals back (``on_script_unloaded``). Merging is therefore lazy: at a layer's next forward.
"""

import torch

import networks
from modules import shared

_CLASSES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)


def _make_forward(original):
    def forward(self, *args, **kwargs):
        if getattr(shared.opts, "lora_functional", False) and not isinstance(self, torch.nn.MultiheadAttention):
            return networks.network_forward(self, args[0], original)
        networks.network_apply_weights(self)
        return original(self, *args, **kwargs)

    return forward


def _make_load(original):
    def load(self, *args, **kwargs):
        networks.network_reset_cached_weight(self)
        return original(self, *args, **kwargs)

    return load


# A1111 v1.10 extensions-builtin/Lora/lora_patches.py: LoraPatches


class LoraPatches:
    def __init__(self):
        self.saved = []
        for cls in _CLASSES:
            for field, make in (("forward", _make_forward), ("_load_from_state_dict", _make_load)):
                original = getattr(cls, field)
                self.saved.append((cls, field, original, field in cls.__dict__))
                setattr(cls, field, make(original))

    def undo(self):
        for cls, field, original, own in reversed(self.saved):
            if own:
                setattr(cls, field, original)
            else:
                delattr(cls, field)
        self.saved = []
