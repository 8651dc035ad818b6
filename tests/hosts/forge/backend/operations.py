"""Stand-in of Forge backend/operations.py ``get_weight_and_bias``: what every Forge linear
computes with at each forward: the stored weight dequantized (GGUF ``dequantize_tensor``,
bitsandbytes ``functional_dequantize_4bit``) or cast, times ``scale_weight`` when the layer has
one, plus the online LoRA patches of ``layer.forge_online_loras['weight']`` merged by
``merge_lora_to_weight`` in that dtype."""

from backend.operations_bnb import functional_dequantize_4bit
from backend.operations_gguf import dequantize_tensor
from backend.patcher.lora import merge_lora_to_weight

bnb_avaliable = True  # (sic) Forge's spelling; False when bitsandbytes does not import


# Forge backend/operations.py: get_weight_and_bias


def get_weight_and_bias(layer, dtype=None):
    weight = layer.weight
    if getattr(weight, "bnb_quantized", False):
        weight = functional_dequantize_4bit(weight)
    weight = dequantize_tensor(weight)
    if dtype is not None:
        weight = weight.to(dtype)
    scale = getattr(layer, "scale_weight", None)
    if scale is not None:
        weight = weight * scale.to(weight.dtype)
    patches = getattr(layer, "forge_online_loras", None)
    if patches is not None and "weight" in patches:
        weight = merge_lora_to_weight(patches["weight"], weight, "online weight lora", computation_dtype=weight.dtype)
    return weight, layer.bias
