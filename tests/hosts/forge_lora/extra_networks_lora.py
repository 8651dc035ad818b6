"""Stand-in of Forge extensions-builtin/sd_forge_lora/extra_networks_lora.py ``ExtraNetworkLora``:
parses names and te/unet multipliers (unet defaults to te) and calls ``networks.load_networks``."""

import networks
from modules import extra_networks


# Forge extensions-builtin/sd_forge_lora/extra_networks_lora.py: ExtraNetworkLora


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self.errors = {}

    def activate(self, p, params_list):
        names, te, unet = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            t = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            t = float(params.named.get("te", t))
            u = float(params.positional[2]) if len(params.positional) > 2 else t
            unet.append(float(params.named.get("unet", u)))
            te.append(t)
        networks.load_networks(names, te, unet, [None] * len(names))

    def deactivate(self, p):
        pass
