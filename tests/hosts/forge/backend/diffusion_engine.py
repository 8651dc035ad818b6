"""Stand-in of Forge backend/diffusion_engine/base.py ``ForgeObjects`` (``shallow_copy``) and
the engine attributes QR-LoRA reads: ``forge_objects``, ``forge_objects_original``,
``forge_objects_after_applying_lora``, ``current_lora_hash``, ``is_sdxl``, ``model_config.huggingface_repo``,
``sd_checkpoint_info.filename`` (``modules/sd_models.py: forge_model_reload``)."""


class ForgeObjects:
    def __init__(self, unet, clip, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)
