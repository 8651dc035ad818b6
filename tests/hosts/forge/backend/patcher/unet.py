"""Stand-in of Forge backend/patcher/unet.py ``UnetPatcher``: a ``ModelPatcher`` on a
``KModel`` (``.diffusion_model``, ``.storage_dtype``) whose ``clone()`` returns a UnetPatcher."""

from backend.patcher.base import ModelPatcher


# Forge backend/patcher/unet.py: UnetPatcher


class UnetPatcher(ModelPatcher):
    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device)
        n.lora_patches = self.lora_patches.copy()
        return n
