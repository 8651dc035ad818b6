"""Automatic1111 (v1.9+): the fused ΔR goes through the built-in Lora extension's machinery.

Verified against A1111 v1.10 ``extensions-builtin/Lora`` (``networks.py``, ``network.py``):

- Our groups become ``network.Network`` objects whose modules are created by iterating
  ``networks.module_types`` (as ``networks.load_network`` does), where we put one
  ``ModuleType`` first that accepts exactly our weight keys; its ``calc_updown`` returns
  ``Q @ ΔR_fused`` in float32 through ``NetworkModule.finalize_updown`` (multipliers 1, scale 1:
  λ and s are already folded into ΔR). Per-layer problems raise ``RuntimeError``, which
  ``network_apply_weights`` catches and counts in ``extra_network_lora.errors``
  ("Networks with errors" in the comments).
- They are placed in ``networks.loaded_networks`` after Lora rebuilds it: ``load_networks``
  (which ``ExtraNetworkLora.activate`` calls on every run and which clears the list) is
  wrapped to re-append ours, and undone on script unload. Backup, lazy merge on the next
  forward, restore when the set changes, FP8 storage and the functional mode are Lora's.
- The network name carries the group's identity (files, their versions, multipliers), so
  any change makes ``network_current_names`` differ and Lora restores and re-merges.
- OpenCLIP's fused attention needs modules for q, k, v and out_proj together; missing ones
  are added as zero modules.
- Step windows (``start=``/``stop=``): ``modules/script_callbacks.py`` ``on_cfg_denoiser`` runs
  in ``CFGDenoiser.forward`` (``modules/sd_samplers_cfg_denoiser.py``) before each model call;
  where the plan switches, ``on_step`` puts the networks of the new step's groups in
  ``loaded_networks``, so Lora's lazy merge (``network_apply_weights``, in every patched
  module's forward) restores each weight from its backup and merges the new sum at that call.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from . import keymap
from .engine import ModelInfo, report_plan, sampling_step

Q_KEY = "qrlora_q.weight"
DELTA_KEY = "qrlora_delta_r.weight"
_MHA_PARTS = ("_q_proj", "_k_proj", "_v_proj", "_out_proj")


class _OnDisk:
    """What Lora reads from ``net.network_on_disk`` of networks it did not load itself
    (``ExtraNetworkLora.activate`` looks at ``shorthash`` of every loaded network)."""

    def __init__(self, name: str):
        self.name = self.alias = name
        self.filename = ""
        self.hash = self.shorthash = ""
        self.metadata = {}

    def read_hash(self):
        pass


def make_module_type(network):
    """Our ``ModuleType`` / ``NetworkModule`` on the host's own base classes."""

    class NetworkModuleQRLora(network.NetworkModule):
        def __init__(self, net, weights):
            super().__init__(net, weights)
            self.q = weights.w[Q_KEY]
            self.delta = weights.w[DELTA_KEY]

        def calc_updown(self, orig_weight):
            q = self.q.to(orig_weight.device, torch.float32)
            delta = self.delta.to(orig_weight.device, torch.float32)
            rows = orig_weight.shape[0] if orig_weight.dim() == 2 else -1
            if orig_weight.dim() != 2 or orig_weight.shape[1] != delta.shape[1] or rows not in (q.shape[0], 3 * q.shape[0]):
                raise RuntimeError(f"QR-LoRA layer {self.sd_key}: weight {tuple(orig_weight.shape)} does not fit "
                                   f"ΔW {q.shape[0]}×{delta.shape[1]}")
            return self.finalize_updown(q @ delta, orig_weight, [q.shape[0], delta.shape[1]])

        def forward(self, x, y):  # Lora's "functional" mode
            q = self.q.to(x.device, x.dtype)
            delta = self.delta.to(x.device, x.dtype)
            out = torch.nn.functional.linear(torch.nn.functional.linear(x, delta), q)
            return y + out * (self.multiplier() * self.calc_scale())

    class ModuleTypeQRLora(network.ModuleType):
        qrlora_type = True

        def create_module(self, net, weights):
            if Q_KEY in weights.w and DELTA_KEY in weights.w:
                return NetworkModuleQRLora(net, weights)
            return None

    return ModuleTypeQRLora()


class A1111Adapter:
    def __init__(self, engine, networks, network, shared, log=print):
        self.engine = engine
        self.networks = networks
        self.network = network
        self.shared = shared
        self.log = log
        self.current: list = []  # our Network objects for the current pass
        self.plan = None  # the current pass's plan (its switches drive on_step)
        self._built: OrderedDict = OrderedDict()  # (identity, layer mapping) -> Network, current model only
        self._model = None  # weak reference to the model the networks were built on
        self._keep = 2  # networks kept built: raised to every group of the last two plans
        self.module_type = make_module_type(network)

    # ----------------------------------------------------------------- install
    def install(self) -> None:
        nets = self.networks
        original = nets.load_networks
        while getattr(original, "_qrlora_original", None) is not None:  # a reload: unwrap our old wrapper
            original = original._qrlora_original
        adapter = self

        def load_networks(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                adapter.sync()

        load_networks._qrlora_original = original
        load_networks._qrlora_adapter = self
        nets.load_networks = load_networks
        nets.module_types[:] = [self.module_type] + [t for t in nets.module_types if not getattr(t, "qrlora_type", False)]

    def uninstall(self) -> None:
        nets = self.networks
        if getattr(nets.load_networks, "_qrlora_adapter", None) is self:
            nets.load_networks = nets.load_networks._qrlora_original
        nets.module_types[:] = [t for t in nets.module_types if not getattr(t, "qrlora_type", False)]
        self.current = []
        self._built.clear()
        self.sync()

    def sync(self) -> None:
        """Our networks at the end of ``networks.loaded_networks`` (the list object is kept)."""
        loaded = self.networks.loaded_networks
        loaded[:] = [n for n in loaded if not getattr(n, "qrlora", False)] + list(self.current)

    # ----------------------------------------------------------------- activation
    def activate(self, p, params_list) -> None:
        sd_model = getattr(p, "sd_model", None) or self.shared.sd_model
        try:
            self.plan = None
            plan = self.engine.plan([list(params.items) for params in params_list], self.model_info(sd_model))
            self._keep = max(2, 2 * len(plan.all_groups()))
            self.current = [self._network(g, sd_model) for g in plan.groups]
            self.plan = plan
        except Exception:
            self.current = []  # never leave the previous prompt's networks applied
            raise
        finally:
            self.sync()
        report_plan(p, plan, self.engine.options, self.log)

    def deactivate(self, p) -> None:
        pass  # like Lora: weights are restored lazily when the wanted set changes

    def on_step(self, params) -> None:
        """``on_cfg_denoiser``: at a step where a window opens or closes, the networks of that
        step replace ours in ``loaded_networks``; at every other step nothing changes."""
        plan = self.plan
        if plan is None or not plan.switches or self._model is None or self._model() is None:
            return
        groups = plan.groups_at(sampling_step(params))
        if [g.identity for g in groups] == [n.qrlora_identity for n in self.current]:
            return
        self.current = [self._network(g, self._model()) for g in groups]
        self.sync()

    # ----------------------------------------------------------------- the model
    def _mapping(self, sd_model) -> dict:
        mapping = getattr(sd_model, "network_layer_mapping", None)
        if mapping is None:
            self.networks.assign_network_names_to_compvis_modules(sd_model)
            mapping = getattr(sd_model, "network_layer_mapping", {})
        return mapping

    def model_info(self, sd_model) -> ModelInfo:
        if sd_model is None:
            return ModelInfo(None, None, lambda t: None, "not loaded")
        arch = "sdxl" if getattr(sd_model, "is_sdxl", False) else None
        kinds = [k for k in ("is_sd1", "is_sd2", "is_sd3", "is_ssd") if getattr(sd_model, k, False)]
        info = getattr(sd_model, "sd_checkpoint_info", None)
        checkpoint = getattr(info, "filename", None) or getattr(sd_model, "filename", None)
        mapping = self._mapping(sd_model) if arch else {}

        def layer_shape(target):
            try:
                loc = keymap.a1111_layer(target)
            except KeyError:
                return None
            module = mapping.get(loc.layer_name)
            if module is None:
                return None
            if loc.qkv is not None:
                w = getattr(module, "in_proj_weight", None)
                return None if w is None else (w.shape[0] // 3, w.shape[1])
            w = getattr(module, "weight", None)
            if w is None:
                return None
            return tuple(w.shape)

        return ModelInfo(arch, checkpoint, layer_shape, kinds[0][3:].upper() if kinds else "",
                         host="Automatic1111", host_archs=("sdxl",))  # A1111 has no FLUX

    def _network(self, group, sd_model):
        # Networks hold the model's modules: on a model change drop them all, so the old
        # checkpoint is freed (ids alone could also be reused by a new model).
        if self._model is None or self._model() is not sd_model:
            self._built.clear()
            self._model = weakref.ref(sd_model)
        key = (group.identity, id(self._mapping(sd_model)))
        net = self._built.get(key)
        if net is None:
            net = self._build(group, self._mapping(sd_model))
            self._built[key] = net
            while len(self._built) > self._keep:  # every group of this plan and the one before
                self._built.popitem(last=False)
        return net

    def _build(self, group, mapping):
        name = f"qrlora/{group.title}/{group.identity}"
        net = self.network.Network(name, _OnDisk(name))
        net.te_multiplier = net.unet_multiplier = 1.0
        net.dyn_dim = None
        net.mentioned_name = None  # Lora lists only its own networks in "Lora hashes"
        net.bundle_embeddings = {}
        net.qrlora = True
        net.qrlora_identity = group.identity
        for layer in group.layers.values():
            loc = keymap.a1111_layer(layer.target)
            self._add(net, loc.network_key, mapping[loc.layer_name], layer.q, layer.delta)
        self._complete_attention(net, mapping)
        return net

    def _add(self, net, network_key, sd_module, q, delta):
        weights = self.network.NetworkWeights(network_key=network_key, sd_key=network_key,
                                              w={Q_KEY: q, DELTA_KEY: delta}, sd_module=sd_module)
        for module_type in self.networks.module_types:  # as networks.load_network picks a type
            module = module_type.create_module(net, weights)
            if module is not None:
                net.modules[network_key] = module
                return
        raise RuntimeError(f"no Lora module type accepts QR-LoRA layer {network_key}")

    def _complete_attention(self, net, mapping):
        """Lora merges an ``nn.MultiheadAttention`` only when q, k, v and out_proj modules
        all exist: add zero ones for those the files do not train."""
        heads = set()
        for key in net.modules:
            for part in _MHA_PARTS:
                if key.endswith(part) and isinstance(mapping.get(key[: -len(part)]), torch.nn.MultiheadAttention):
                    heads.add(key[: -len(part)])
        for head in heads:
            mha = mapping[head]
            for part in _MHA_PARTS:
                key = head + part
                if key in net.modules:
                    continue
                weight = mha.out_proj.weight if part == "_out_proj" else mha.in_proj_weight
                out_f = weight.shape[0] if part == "_out_proj" else weight.shape[0] // 3
                sd_module = mapping.get(key, mha) if part == "_out_proj" else mha
                self._add(net, key, sd_module, torch.zeros(out_f, 1), torch.zeros(1, weight.shape[1]))
