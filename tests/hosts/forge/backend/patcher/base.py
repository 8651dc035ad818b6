"""Stand-in of Forge backend/patcher/base.py ``ModelPatcher``.

``__init__`` attaches one ``LoraLoader`` to the underlying module (shared by all clones);
``clone()`` copies ``lora_patches`` shallowly; ``add_patches(*, filename, patches,
strength_patch=1.0, strength_model=1.0, online_mode=False)``: a key is a parameter name or a
tuple ``(name, offset[, function])``; only names in ``model.named_parameters()`` are kept, as
``[strength_patch, value, strength_model, offset, function]`` under
``lora_patches[(filename, strength_patch, strength_model, online_mode)][name]`` (the same
identity added again replaces the earlier one); returns the set of accepted keys.
``refresh_loras()`` is what loading the patcher (``LoadedModel.model_load``) ends with.
"""

from backend.patcher.lora import LoraLoader


# Forge backend/patcher/base.py: ModelPatcher


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    # Forge backend/patcher/base.py: clone

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.lora_patches = self.lora_patches.copy()
        return n

    # Forge backend/patcher/base.py: add_patches

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}
        accepted = set()
        model_keys = set(k for k, _ in self.model.named_parameters())
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                if len(k) > 2:
                    function = k[2]
            if key in model_keys:
                accepted.add(k)
                this_patches.setdefault(key, []).append([strength_patch, patches[k], strength_model, offset, function])
        self.lora_patches[identifier] = this_patches
        return accepted

    # Forge backend/patcher/base.py: refresh_loras

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)
