"""Stand-in of A1111 v1.10 extensions-builtin/Lora/networks.py (the parts QR-LoRA meets).

- ``module_types``: the list ``load_network`` tries in order (first non-None ``create_module`` wins).
- ``assign_network_names_to_compvis_modules(sd_model)``: SDXL embedders' ``wrapped`` modules as
  ``f"{i}_{name}"``, ``sd_model.model`` modules as ``name`` (``.`` → ``_``), stored on each module
  (``network_layer_name``) and in ``sd_model.network_layer_mapping``.
- ``load_network(name, on_disk)``: keys split at the first ``.``; the module part converted
  (``convert_diffusers_name_to_compvis`` for ``lora_te2_text_model_encoder_layers_N_…`` →
  ``1_model_transformer_resblocks_N_…``), then the fallbacks: ``(.*)_([qkv]_proj)$`` onto the
  fused attention module, ``lora_unet`` → ``diffusion_model``, ``lora_te1_text_model`` →
  ``0_transformer_text_model``; unmatched keys are skipped; a key set no type accepts fails the file.
- ``load_networks(names, te, unet, dyn)``: keeps wanted entries of ``loaded_networks``, **clears
  the list**, loads (or reuses ``networks_in_memory`` unless the file is newer), sets multipliers,
  appends; unknown names → "Lora not found" comment; ``purge_networks_from_memory``.
- ``network_apply_weights(layer)``: wanted = ``(name, te, unet, dyn)`` of every loaded network;
  backup to CPU on the first change (``RuntimeError`` if modified without backup); when wanted ≠
  ``network_current_names``: restore from backup, then per network ``calc_updown(weight)`` and
  ``weight.copy_((weight.to(updown.dtype) + updown).to(weight.dtype))``; for
  ``nn.MultiheadAttention`` only when ``_q_proj``/``_k_proj``/``_v_proj``/``_out_proj`` modules all
  exist: ``in_proj_weight.chunk(3)`` parts → ``in_proj_weight += vstack(q, k, v)``,
  ``out_proj.weight += out``; a ``RuntimeError`` is counted in ``extra_network_lora.errors[name]``.
- ``network_reset_cached_weight``: forget names and backups (a checkpoint reload).
"""

import os
import re

import torch
from safetensors.torch import load_file

import network
import network_lora
from modules import devices, shared

module_types = [network_lora.ModuleTypeLora()]

re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")

originals = None
extra_network_lora = None
available_networks = {}
available_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}
comments = []  # stand-in for sd_hijack.model_hijack.comments


# A1111 v1.10 extensions-builtin/Lora/networks.py: convert_diffusers_name_to_compvis


def convert_diffusers_name_to_compvis(key, is_sd2):
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        n, rest = m.groups()
        if "mlp_fc1" in rest:
            return f"1_model_transformer_resblocks_{n}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in rest:
            return f"1_model_transformer_resblocks_{n}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{n}_{rest.replace('self_attn', 'attn')}"
    return key


# A1111 v1.10 extensions-builtin/Lora/networks.py: assign_network_names_to_compvis_modules


def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    if sd_model.is_sdxl:
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if not hasattr(embedder, "wrapped"):
                continue
            for name, module in embedder.wrapped.named_modules():
                network_name = f"{i}_{name.replace('.', '_')}"
                mapping[network_name] = module
                module.network_layer_name = network_name
    for name, module in sd_model.model.named_modules():
        network_name = name.replace(".", "_")
        mapping[network_name] = module
        module.network_layer_name = network_name
    sd_model.network_layer_mapping = mapping


# A1111 v1.10 extensions-builtin/Lora/networks.py: load_network


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = load_file(network_on_disk.filename)
    sd_model = shared.sd_model
    if not hasattr(sd_model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(sd_model)
    mapping = sd_model.network_layer_mapping
    matched = {}
    for key_network, weight in sd.items():
        module_part, _, network_part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(module_part, False)
        sd_module = mapping.get(key)
        if sd_module is None:
            m = re_x_proj.match(key)
            if m:
                sd_module = mapping.get(m.group(1))
        if sd_module is None and "lora_unet" in module_part:
            key = module_part.replace("lora_unet", "diffusion_model")
            sd_module = mapping.get(key)
        elif sd_module is None and "lora_te1_text_model" in module_part:
            key = module_part.replace("lora_te1_text_model", "0_transformer_text_model")
            sd_module = mapping.get(key)
        if sd_module is None:
            continue
        if key not in matched:
            matched[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)
        matched[key].w[network_part] = weight
    for key, weights in matched.items():
        net_module = None
        for nettype in module_types:
            net_module = nettype.create_module(net, weights)
            if net_module is not None:
                break
        if net_module is None:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights.w)}")
        net.modules[key] = net_module
    return net


# A1111 v1.10 extensions-builtin/Lora/networks.py: purge_networks_from_memory


def purge_networks_from_memory():
    while len(networks_in_memory) > getattr(shared.opts, "lora_in_memory_limit", 0) and networks_in_memory:
        networks_in_memory.pop(next(iter(networks_in_memory)), None)


# A1111 v1.10 extensions-builtin/Lora/networks.py: load_networks


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()
    if any(available_network_aliases.get(n) is None for n in names):
        list_available_networks()
    failed = []
    for i, name in enumerate(names):
        on_disk = available_network_aliases.get(name)
        net = already_loaded.get(name)
        if on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)
            if net is None or os.path.getmtime(on_disk.filename) > net.mtime:
                try:
                    net = load_network(name, on_disk)
                    networks_in_memory.pop(name, None)
                    networks_in_memory[name] = net
                except Exception as e:
                    from modules import errors
                    errors.display(e, f"loading network {on_disk.filename}")
                    continue
            net.mentioned_name = name
            on_disk.read_hash()
        if net is None:
            failed.append(name)
            continue
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)
    if failed:
        comments.append(f"Lora not found: {', '.join(failed)}")
    purge_networks_from_memory()


def _store(weight):
    return None if weight is None else weight.to(devices.cpu, copy=True)


def _restore(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


# A1111 v1.10 extensions-builtin/Lora/networks.py: network_restore_weights_from_backup


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            _restore(self, "in_proj_weight", weights_backup[0])
            _restore(self.out_proj, "weight", weights_backup[1])
        else:
            _restore(self, "weight", weights_backup)
    if isinstance(self, torch.nn.MultiheadAttention):
        _restore(self.out_proj, "bias", bias_backup)
    else:
        _restore(self, "bias", bias_backup)


# A1111 v1.10 extensions-builtin/Lora/networks.py: network_apply_weights


def network_apply_weights(self):
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)

    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError(f"{network_layer_name} - no backup weights found and current weights are not unchanged")
        if isinstance(self, torch.nn.MultiheadAttention):
            weights_backup = (_store(self.in_proj_weight), _store(self.out_proj.weight))
        else:
            weights_backup = _store(self.weight)
        self.network_weights_backup = weights_backup

    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        if isinstance(self, torch.nn.MultiheadAttention) and self.out_proj.bias is not None:
            bias_backup = _store(self.out_proj.bias)
        elif getattr(self, "bias", None) is not None:
            bias_backup = _store(self.bias)
        self.network_bias_backup = bias_backup

    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(network_layer_name, None)
            if module is not None and hasattr(self, "weight"):
                try:
                    with torch.no_grad():
                        weight = self.weight
                        updown, ex_bias = module.calc_updown(weight)
                        self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
                        if ex_bias is not None and getattr(self, "bias", None) is not None:
                            self.bias.copy_((self.bias + ex_bias).to(dtype=self.bias.dtype))
                except RuntimeError:
                    extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
                continue

            module_q = net.modules.get(network_layer_name + "_q_proj", None)
            module_k = net.modules.get(network_layer_name + "_k_proj", None)
            module_v = net.modules.get(network_layer_name + "_v_proj", None)
            module_out = net.modules.get(network_layer_name + "_out_proj", None)
            if isinstance(self, torch.nn.MultiheadAttention) and module_q and module_k and module_v and module_out:
                try:
                    with torch.no_grad():
                        qw, kw, vw = self.in_proj_weight.chunk(3, 0)
                        updown_q, _ = module_q.calc_updown(qw)
                        updown_k, _ = module_k.calc_updown(kw)
                        updown_v, _ = module_v.calc_updown(vw)
                        updown_qkv = torch.vstack([updown_q, updown_k, updown_v])
                        updown_out, ex_bias = module_out.calc_updown(self.out_proj.weight)
                        self.in_proj_weight += updown_qkv
                        self.out_proj.weight += updown_out
                except RuntimeError:
                    extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
                continue
            if module is None:
                continue
            extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
        self.network_current_names = wanted_names


# A1111 v1.10 extensions-builtin/Lora/networks.py: network_reset_cached_weight


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


# A1111 v1.10 extensions-builtin/Lora/networks.py: network_forward


def network_forward(org_module, input, original_forward):
    """The ``lora_functional`` path: original weights, plus each module's ``forward``."""
    if len(loaded_networks) == 0:
        return original_forward(org_module, input)
    network_restore_weights_from_backup(org_module)
    network_reset_cached_weight(org_module)
    y = original_forward(org_module, input)
    name = getattr(org_module, "network_layer_name", None)
    for lora in loaded_networks:
        module = lora.modules.get(name, None)
        if module is not None:
            y = module.forward(input, y)
    return y


# A1111 v1.10 extensions-builtin/Lora/networks.py: list_available_networks


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    folder = shared.cmd_opts.lora_dir
    if not folder or not os.path.isdir(folder):
        return
    for dirpath, _, filenames in os.walk(folder):
        for fn in sorted(filenames):
            if os.path.splitext(fn)[1].lower() not in (".safetensors",):
                continue
            name = os.path.splitext(fn)[0]
            entry = network.NetworkOnDisk(name, os.path.join(dirpath, fn))
            available_networks[name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry
