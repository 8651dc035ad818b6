"""Run the extension in a stand-in host, the way each WebUI loads and drives it.

``Host("a1111" | "forge", tmp)`` puts the host's stand-in packages first on ``sys.path``
(after saving and clearing any modules of the same names), loads the built-in LoRA extension,
runs our ``preload.py``, loads ``scripts/qrlora.py`` with ``spec_from_file_location`` (as
``modules/script_loading.load_module`` does), then the ``before_ui`` callbacks (after
``extra_networks.initialize()``, as ``initialize_rest`` does). ``close()`` runs the unload
callbacks and restores ``sys.modules`` and ``sys.path``.

``generate(prompt, hr_prompt=None)`` follows ``modules/processing.py`` (with ``steps=N``, each
sampling pass runs N steps through the denoiser loop of ``modules/sd_samplers_cfg_denoiser.py``,
``on_step(pass, i)`` seeing the weights of step i's model call; without, one model evaluation):

- A1111 ``process_images_inner``: parse the prompt's extra networks, ``extra_networks.activate``,
  sample (every layer runs its forward, which merges lazily), for the hires pass activate the
  hires prompt's networks and sample again; ``extra_networks.deactivate`` at the end.
- Forge: ``forge_objects = forge_objects_original.shallow_copy()``, activate (ends with
  ``after_extra_networks_activate``), ``forge_objects = forge_objects_after_applying_lora.shallow_copy()``,
  ``setup_conds`` (the CLIP patcher is loaded: ``refresh_loras``), ``sample``: reset the objects,
  ``process_before_every_sampling``, load the UNet patcher; hires: activate the hires data, encode,
  ``process_before_every_sampling``, reset, ``process_before_every_sampling``, load.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

HOSTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HOSTS))
HOST_PATHS = {
    "a1111": [os.path.join(HOSTS, "webui"), os.path.join(HOSTS, "a1111_lora")],
    "forge": [os.path.join(HOSTS, "webui"), os.path.join(HOSTS, "forge"), os.path.join(HOSTS, "forge_lora")],
}
HOST_MODULES = ("modules", "network", "networks", "network_lora", "lora_patches", "extra_networks_lora",
                "backend", "modules_forge", "qrlora_ext", "qrlora_bootstrap")


def _ours(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in HOST_MODULES)


class P:
    """Stand-in of ``StableDiffusionProcessing`` (the attributes extra networks and scripts use)."""

    def __init__(self, sd_model, prompt, hr_prompt=None, scripts=None):
        from modules import extra_networks

        self.sd_model = sd_model
        self.prompt, self.hr_prompt = prompt, hr_prompt
        self.all_prompts = [prompt]
        self.prompts, self.extra_network_data = extra_networks.parse_prompts([prompt])
        self.hr_extra_network_data = extra_networks.parse_prompts([hr_prompt])[1] if hr_prompt is not None else None
        self.extra_generation_params = {}
        self.comments = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.seeds = self.subseeds = [0]
        self.scripts = scripts
        self.disable_extra_networks = False

    def comment(self, text):
        self.comments[text] = 1


class Host:
    def __init__(self, kind: str, tmp: str, qrlora_dir: str, lora_dir: str = "", basis_dir: str | None = None,
                 checkpoint: str | None = None, sd_model=None):
        assert kind in HOST_PATHS
        self.kind = kind
        self._saved_path = list(sys.path)
        self._saved_modules = {k: v for k, v in sys.modules.items() if _ours(k)}
        for k in self._saved_modules:
            del sys.modules[k]
        sys.path[:0] = HOST_PATHS[kind]
        self.patches = None
        from modules import extra_networks, script_callbacks, shared

        script_callbacks.clear_callbacks()
        parser = argparse.ArgumentParser()
        self._run_file(os.path.join(ROOT, "preload.py")).preload(parser)
        args = parser.parse_args([f"--qrlora-dir={qrlora_dir}"] +
                                 ([f"--qrlora-basis-dir={basis_dir}"] if basis_dir else []))
        shared.cmd_opts.qrlora_dir, shared.cmd_opts.qrlora_basis_dir = args.qrlora_dir, args.qrlora_basis_dir
        shared.cmd_opts.lora_dir = lora_dir
        self.shared = shared
        self.extra_networks = extra_networks
        self.script_callbacks = script_callbacks
        if kind == "a1111":
            import extra_networks_lora
            import lora_patches
            import networks

            self.networks = networks
            networks.originals = self.patches = lora_patches.LoraPatches()
            networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
            self.lora = networks.extra_network_lora
            script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
            script_callbacks.on_script_unloaded(networks.originals.undo)
        else:
            import extra_networks_lora
            import networks

            self.networks = networks
            self.lora = extra_networks_lora.ExtraNetworkLora()
        # the built-in LoRA script registers its tag in before_ui (built-ins load first; the
        # before_ui callbacks run in reverse, so ours registers first)
        script_callbacks.on_before_ui(lambda: extra_networks.register_extra_network(self.lora))
        # modules/scripts.load_scripts: ``sys.path = [basedir] + sys.path`` around our script file,
        # loaded by path. A1111 puts the saved list back afterwards; Forge keeps the new list for
        # the whole session (our entry file takes the folder off it again).
        # the built-in scripts/xyz_grid.py is loaded before extensions' scripts (load_scripts)
        from modules import scripts as host_scripts

        self.xyz = self._run_file(os.path.join(HOSTS, "xyz_grid.py"))
        host_scripts.scripts_data[:] = [host_scripts.ScriptClassData(
            type("Script", (), {"__module__": "xyz_grid.py"}), os.path.join(HOSTS, "xyz_grid.py"), HOSTS, self.xyz)]
        saved = sys.path
        sys.path = [ROOT] + sys.path
        try:
            self.script_module = self._run_file(os.path.join(ROOT, "scripts", "qrlora.py"))
        finally:
            if kind == "a1111":
                sys.path = saved
        self.root_left_on_path = ROOT in sys.path
        from modules import scripts

        self.scripts = [cls() for cls in scripts.script_classes(self.script_module)]
        self.runner = scripts.ScriptRunner(self.scripts)
        # initialize_rest: registries cleared after scripts load, then before_ui registers
        extra_networks.initialize()
        from modules import ui_extra_networks

        ui_extra_networks.extra_pages.clear()
        script_callbacks.before_ui_callback()
        self.qrlora = extra_networks.extra_network_registry.get("qrlora")
        self.pages = list(ui_extra_networks.extra_pages)
        if sd_model is not None:
            self.load_model(sd_model)

    @staticmethod
    def _run_file(path):
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    @property
    def engine(self):
        return self.script_module._webui.setup.engine

    @property
    def adapter(self):
        return self.script_module._webui.setup.adapter

    def load_model(self, sd_model):
        self.sd_model = sd_model
        self.shared.sd_model = sd_model
        self.script_callbacks.model_loaded_callback(sd_model)

    # ----------------------------------------------------------------- generations
    def generate(self, prompt: str, hr_prompt: str | None = None, steps: int | None = None,
                 hr_steps: int | None = None, on_step=None, second_order: bool = False) -> P:
        p = P(self.sd_model, prompt, hr_prompt, scripts=self.runner if self.kind == "forge" else None)

        def sample(which, evaluate):
            n = steps if which == "first" else (hr_steps or steps)
            if n is None:
                evaluate()
                return
            from modules import sd_samplers_cfg_denoiser

            def model_call(i):
                evaluate()
                if on_step is not None:
                    on_step(which, i)

            sd_samplers_cfg_denoiser.sample(p, n, model_call, second_order)

        if self.kind == "a1111":
            self.extra_networks.activate(p, p.extra_network_data)
            sample("first", self.sample_a1111)
            if hr_prompt is not None:
                p.is_hr_pass = True
                self.extra_networks.activate(p, p.hr_extra_network_data)
                sample("hires", self.sample_a1111)
                p.is_hr_pass = False
        else:
            sd = self.sd_model
            sd.forge_objects = sd.forge_objects_original.shallow_copy()
            self.extra_networks.activate(p, p.extra_network_data)
            sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
            sd.forge_objects.clip.patcher.refresh_loras()  # setup_conds: load_model_gpu(clip.patcher)
            sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()  # sample()
            self.runner.process_before_every_sampling(p)
            sd.forge_objects.unet.refresh_loras()  # sampling_prepare: load_models_gpu([unet])
            sample("first", lambda: None)  # the model computes with the weights as merged
            if hr_prompt is not None:
                p.is_hr_pass = True
                self.extra_networks.activate(p, p.hr_extra_network_data)
                sd.forge_objects.clip.patcher.refresh_loras()  # calculate_hr_conds
                self.runner.process_before_every_sampling(p)
                sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
                self.runner.process_before_every_sampling(p)
                sd.forge_objects.unet.refresh_loras()
                sample("hires", lambda: None)
                p.is_hr_pass = False
        if p.extra_network_data:
            self.extra_networks.deactivate(p, p.extra_network_data)
        return p

    def sample_a1111(self):
        """One model evaluation: every patched layer the model calls runs its forward (an
        ``nn.MultiheadAttention``'s ``out_proj`` is used by the attention, never called itself)."""
        inside_mha = set()
        for name, m in self.sd_model.named_modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                inside_mha.add(name + ".out_proj")
        with torch.no_grad():
            for name, m in self.sd_model.named_modules():
                if name in inside_mha:
                    continue
                if isinstance(m, torch.nn.MultiheadAttention):
                    x = torch.zeros(1, 2, m.embed_dim, dtype=m.in_proj_weight.dtype)
                    m(x, x, x, need_weights=False)
                elif isinstance(m, torch.nn.Linear):
                    m(torch.zeros(1, m.in_features, dtype=m.weight.dtype))
                elif isinstance(m, (torch.nn.Conv2d, torch.nn.LayerNorm)):
                    # what their patched forward does before the (here irrelevant) convolution / norm
                    self.networks.network_apply_weights(m)

    def close(self):
        try:
            self.script_callbacks.script_unloaded_callback()
        finally:
            for k in [k for k in sys.modules if _ours(k)]:
                del sys.modules[k]
            sys.modules.update(self._saved_modules)
            sys.path[:] = self._saved_path
