"""Stand-in of A1111 v1.10 extensions-builtin/Lora/network.py.

- ``NetworkWeights(network_key, sd_key, w, sd_module)``; ``Network(name, network_on_disk)``
  with ``te_multiplier``, ``unet_multiplier``, ``dyn_dim``, ``modules``, ``bundle_embeddings``,
  ``mtime``, ``mentioned_name``;
- ``NetworkOnDisk``: metadata from the safetensors header, ``alias`` = ``ss_output_name`` or the
  name, hash = the addnet hash (SHA-256 of the tensor data), ``shorthash`` its first 12 digits;
- ``NetworkModule.__init__``: ``shape`` = the module's weight shape, or ``out_proj.weight.shape``
  for ``nn.MultiheadAttention``; ``bias``/``alpha``/``scale``/``dora_scale`` from ``weights.w``;
  ``multiplier()``: te if ``'transformer' in sd_key[:20]`` else unet; ``calc_scale()``: scale,
  else alpha/dim, else 1; ``finalize_updown``: reshape to the original weight when sizes agree,
  × calc_scale × multiplier (``ex_bias`` × multiplier).
"""

import hashlib
import json
import struct
from collections import namedtuple

import torch.nn as nn

NetworkWeights = namedtuple("NetworkWeights", ["network_key", "sd_key", "w", "sd_module"])


def _header(filename):
    with open(filename, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header.get("__metadata__", {}) or {}, 8 + n


def addnet_hash(filename):
    _, offset = _header(filename)
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        f.seek(offset)
        h.update(f.read())
    return h.hexdigest()


# A1111 v1.10 extensions-builtin/Lora/network.py: NetworkOnDisk


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.is_safetensors = filename.lower().endswith(".safetensors")
        self.metadata = _header(filename)[0] if self.is_safetensors else {}
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None
        self.set_hash(self.metadata.get("sshs_model_hash") or "")

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]
        if self.shorthash:
            import networks
            networks.available_network_hash_lookup[self.shorthash] = self

    def read_hash(self):
        if not self.hash:
            self.set_hash(addnet_hash(self.filename) if self.is_safetensors else "")

    def get_alias(self):
        return self.alias


# A1111 v1.10 extensions-builtin/Lora/network.py: Network


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None
        self.mentioned_name = None


# A1111 v1.10 extensions-builtin/Lora/network.py: ModuleType


class ModuleType:
    def create_module(self, net, weights):
        return None


# A1111 v1.10 extensions-builtin/Lora/network.py: NetworkModule


class NetworkModule:
    def __init__(self, net, weights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        if hasattr(self.sd_module, "weight"):
            self.shape = self.sd_module.weight.shape
        elif isinstance(self.sd_module, nn.MultiheadAttention):
            self.shape = self.sd_module.out_proj.weight.shape
        else:
            self.shape = None
        self.dim = None
        self.bias = weights.w.get("bias")
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None
        self.dora_scale = weights.w.get("dora_scale", None)
        self.dora_norm_dims = len(self.shape) - 1

    # A1111 v1.10 extensions-builtin/Lora/network.py: multiplier

    def multiplier(self):
        if "transformer" in self.sd_key[:20]:
            return self.network.te_multiplier
        return self.network.unet_multiplier

    # A1111 v1.10 extensions-builtin/Lora/network.py: calc_scale

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    # A1111 v1.10 extensions-builtin/Lora/network.py: finalize_updown

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if self.bias is not None:
            updown = updown.reshape(self.bias.shape)
            updown += self.bias.to(orig_weight.device, dtype=updown.dtype)
            updown = updown.reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        if ex_bias is not None:
            ex_bias = ex_bias * self.multiplier()
        updown = updown * self.calc_scale()
        return updown * self.multiplier(), ex_bias

    def calc_updown(self, target):
        raise NotImplementedError()

    def forward(self, x, y):
        raise NotImplementedError()
