"""Stand-in of A1111 v1.10 extensions-builtin/Lora/network_lora.py (and ``lyco_helpers.rebuild_conventional``).

``ModuleTypeLora`` accepts ``lora_up.weight`` + ``lora_down.weight`` (or ``lora_A``/``lora_B``);
``NetworkModuleLora`` copies them into bias-free ``nn.Linear`` modules on the CPU in
``devices.dtype``, ``dim = down.shape[0]``; ``calc_updown`` = ``finalize_updown(up @ down)``
(``dyn_dim`` truncates the rank).
"""

import torch

import network
from modules import devices


# A1111 v1.10 extensions-builtin/Lora/network_lora.py: ModuleTypeLora


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net, weights):
        if all(x in weights.w for x in ["lora_up.weight", "lora_down.weight"]):
            return NetworkModuleLora(net, weights)
        if all(x in weights.w for x in ["lora_A.weight", "lora_B.weight"]):
            w = weights.w.copy()
            weights.w.clear()
            weights.w.update({"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]})
            return NetworkModuleLora(net, weights)
        return None


# A1111 v1.10 extensions-builtin/Lora/network_lora.py: NetworkModuleLora


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up_model = self._linear(weights.w["lora_up.weight"])
        self.down_model = self._linear(weights.w["lora_down.weight"])
        self.dim = weights.w["lora_down.weight"].shape[0]

    def _linear(self, weight):
        weight = weight.reshape(weight.shape[0], -1)
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            module.weight.copy_(weight)
        module.to(device=devices.cpu, dtype=devices.dtype)
        module.weight.requires_grad_(False)
        return module

    # A1111 v1.10 extensions-builtin/Lora/network_lora.py: calc_updown

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        dyn = self.network.dyn_dim
        if dyn is not None:
            up, down = up[:, :dyn], down[:dyn, :]
        updown = (up @ down).reshape(output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)

    def forward(self, x, y):
        return y + self.up_model(self.down_model(x)) * self.multiplier() * self.calc_scale()
