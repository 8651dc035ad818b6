"""Stand-in of Forge backend/patcher/clip.py ``CLIP``: ``cond_stage_model`` (a ``ModuleDict``
of text models: ``clip_l``, ``clip_g``), ``patcher = ModelPatcher(cond_stage_model)``,
``clone()`` (new CLIP sharing the module, cloned patcher), ``add_patches`` → the patcher's."""

import torch

from backend.patcher.base import ModelPatcher


class JointTextEncoder(torch.nn.ModuleDict):
    pass


# Forge backend/patcher/clip.py: CLIP


class CLIP:
    def __init__(self, model_dict=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = JointTextEncoder(model_dict or {})
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
