"""Stand-in of Forge backend/patcher/lora.py: ``merge_lora_to_weight`` and ``LoraLoader``.

``merge_lora_to_weight(patches, weight, key, computation_dtype)``: works on a copy in the
computation dtype; per patch ``[strength, value, strength_model, offset, function]``: narrow
the weight to ``offset = (dim, start, length)``, × strength_model, then ``"lora"``:
``alpha = v[2] / down.shape[0]`` (1 when None), ``weight += function(strength · alpha · up @ down)``
(reshaped to the slice); ``"diff"``: ``weight += strength · w``; result cast back.

``LoraLoader.refresh(lora_patches, offload_device)``: returns at once if
``str(list(lora_patches.keys()))`` equals the loaded hash (identities only, not tensors);
otherwise drops online patches, puts every backed-up parameter back, then per
``(key, online)``: online → ``parent.forge_online_loras[child] = patches``; offline → back up
the parameter (once, ``weight.to(offload_device)``: a copy for GGUF and 4-bit parameters),
dequantize a bitsandbytes 4-bit weight (``functional_dequantize_4bit``) or a GGUF one
(``dequantize_tensor``), merge in float32, then give it back to its storage: 4-bit →
``parent.reload_weight(weight)`` (re-quantized), GGUF → ``gguf_cls.quantize_pytorch(weight,
parameter)`` (re-quantized in place; raises ``NotImplementedError`` for types without a
PyTorch quantizer, leaving the parameters patched before it merged), anything else → a new
``nn.Parameter`` of the merged weight cast back to the stored dtype (fp8 rounds to fp8).
"""

import torch


def get_attr_with_parent(obj, key):
    parts = key.split(".")
    parent = obj
    for name in parts[:-1]:
        parent = getattr(parent, name)
    return parent, parts[-1], getattr(parent, parts[-1])


def set_attr_raw(obj, key, value):
    parent, child, _ = get_attr_with_parent(obj, key)
    setattr(parent, child, value)


# Forge backend/patcher/lora.py: merge_lora_to_weight


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype_backup = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        dtype_backup = weight.dtype
        weight = weight.to(dtype=computation_dtype)
    for strength, v, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if len(v) == 1:
            weight += strength * v[0].to(weight.device, weight.dtype)
        elif v[0] == "lora":
            up, down, alpha, mid, dora = v[1]
            mat1 = up.to(weight.device, computation_dtype)
            mat2 = down.to(weight.device, computation_dtype)
            alpha = alpha / mat2.shape[0] if alpha is not None else 1.0
            diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
            weight += function(((strength * alpha) * diff).type(weight.dtype))
        else:
            raise ValueError(f"patch type not recognized {v[0]} {key}")
        if old_weight is not None:
            weight = old_weight
    if dtype_backup is not None:
        weight = weight.to(dtype=dtype_backup)
    return weight


# Forge backend/patcher/lora.py: LoraLoader


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.merges = 0  # for tests: how often weights were (re)merged

    @torch.inference_mode()
    # Forge backend/patcher/lora.py: refresh
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current
        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            set_attr_raw(self.model, k, w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for (key, online_mode), current in all_patches.items():
            parent, child, weight = get_attr_with_parent(self.model, key)
            assert isinstance(weight, torch.nn.Parameter)
            if online_mode:
                if not hasattr(parent, "forge_online_loras"):
                    parent.forge_online_loras = {}
                parent.forge_online_loras[child] = current
                self.online_backup.append(parent)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            bnb_layer = gguf_parameter = None
            if hasattr(weight, "bnb_quantized"):
                from backend.operations_bnb import functional_dequantize_4bit

                bnb_layer = parent
                weight = functional_dequantize_4bit(weight)
            gguf_cls = getattr(weight, "gguf_cls", None)
            if gguf_cls is not None:
                from backend.operations_gguf import dequantize_tensor

                gguf_parameter = weight
                weight = dequantize_tensor(weight)
            weight = merge_lora_to_weight(current, weight, key, computation_dtype=torch.float32)
            if bnb_layer is not None:
                bnb_layer.reload_weight(weight)
                continue
            if gguf_cls is not None:
                gguf_cls.quantize_pytorch(weight, gguf_parameter)
                continue
            set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))
        self.loaded_hash = hashes
        self.merges += 1
