"""Forge extension for tools/realhost/forge_check.py: saves the weights Forge computes with.

Linked as ``extensions/qrlora-weight-dump`` by ``forge_setup.py``; does nothing unless
``QRLORA_DUMP_DIR`` is set. ``QRLORA_DUMP_LAYERS`` names modules of the transformer
(``double_blocks.0.img_attn.qkv,...``). A forward pre-hook on each saves the module's weight as
stored at that moment (after Forge merged the LoRA patches, before its forward casts it to the
computation dtype) and its ``scale_weight`` if it has one, at the first forward of each
generation, as ``DIR/genNN-<module>.safetensors`` (NN counts the generations of this process).
"""

import os

from modules import scripts

DUMP_DIR = os.environ.get("QRLORA_DUMP_DIR", "")
LAYERS = [name for name in os.environ.get("QRLORA_DUMP_LAYERS", "").split(",") if name]


class _State:
    generation = 0
    saved = set()


def _pre_hook(name):
    def save(module, args):
        key = (_State.generation, name)
        if key in _State.saved:
            return
        _State.saved.add(key)
        from safetensors.torch import save_file

        tensors = {"weight": module.weight.detach().to("cpu").contiguous()}
        scale = getattr(module, "scale_weight", None)
        if scale is not None:
            tensors["scale_weight"] = scale.detach().to("cpu").contiguous()
        path = os.path.join(DUMP_DIR, f"gen{_State.generation:02d}-{name}.safetensors")
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"[weight dump] {os.path.basename(path)}: {tuple(module.weight.shape)} {module.weight.dtype}", flush=True)

    return save


class WeightDumpScript(scripts.Script):
    def title(self):
        return "QR-LoRA check: weight dump"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if DUMP_DIR else False

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        _State.generation += 1

    def process_before_every_sampling(self, p, *args, **kwargs):
        model = p.sd_model.forge_objects.unet.model.diffusion_model
        for name in LAYERS:
            module = model.get_submodule(name)
            if not getattr(module, "_qrlora_dump_hooked", False):  # the modules outlive the patcher clones
                module.register_forward_pre_hook(_pre_hook(name))
                module._qrlora_dump_hooked = True
