"""Stand-in of A1111 v1.10 extensions-builtin/Lora/extra_networks_lora.py ``ExtraNetworkLora``.

``activate``: per params ``positional[0]`` is the name, te = ``positional[1]`` (default 1) or
``te=``, unet = ``positional[2]`` (default te) or ``unet=``, dyn = ``positional[3]`` / ``dyn=``;
then ``networks.load_networks(names, te, unet, dyn)``; then ``Lora hashes`` from every loaded
network with a shorthash and a ``mentioned_name`` (kept across the hires pass via
``p.lora_hashes``). ``deactivate`` adds ``p.comment("Networks with errors: name (count)")``.
"""

import networks
from modules import extra_networks, shared


# A1111 v1.10 extensions-builtin/Lora/extra_networks_lora.py: ExtraNetworkLora


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    remove_symbols = str.maketrans("", "", ":,")

    def __init__(self):
        super().__init__("lora")
        self.errors = {}

    # A1111 v1.10 extensions-builtin/Lora/extra_networks_lora.py: activate

    def activate(self, p, params_list):
        self.errors.clear()
        names, te_multipliers, unet_multipliers, dyn_dims = [], [], [], []
        for params in params_list:
            assert params.items
            names.append(params.positional[0])
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            dyn = int(params.positional[3]) if len(params.positional) > 3 else None
            dyn = int(params.named["dyn"]) if "dyn" in params.named else dyn
            te_multipliers.append(te)
            unet_multipliers.append(unet)
            dyn_dims.append(dyn)
        networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)
        if getattr(shared.opts, "lora_add_hashes_to_infotext", True):
            if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
                p.lora_hashes = {}
            for item in networks.loaded_networks:
                if item.network_on_disk.shorthash and item.mentioned_name:
                    p.lora_hashes[item.mentioned_name.translate(self.remove_symbols)] = item.network_on_disk.shorthash
            if p.lora_hashes:
                p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())

    # A1111 v1.10 extensions-builtin/Lora/extra_networks_lora.py: deactivate

    def deactivate(self, p):
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))
            self.errors.clear()
