"""What both WebUIs share: options, callbacks, the tag, the card page, the API, paste.

``setup()`` runs once per script load (``scripts/qrlora.py``). Host interfaces used, checked
against A1111 v1.10 and Forge (same files in both unless noted):

- ``modules/shared.py``: ``opts``, ``cmd_opts``, ``state.textinfo``, ``options_templates``,
  ``options_section``, ``OptionInfo`` (``modules/options.py``: ``Options.__getattr__`` falls
  back to the registered default, so values read correctly with ``--nowebui``);
- ``modules/script_callbacks.py``: ``on_before_ui`` (runs in API-only mode too;
  ``initialize_rest`` clears the registries after scripts load, hence registering there),
  ``on_infotext_pasted``, ``on_app_started``, ``on_script_unloaded``, ``on_cfg_denoiser`` (step
  windows: ``CFGDenoiserParams`` with its ``denoiser``);
- ``modules/extra_networks.py``: ``ExtraNetwork``, ``register_extra_network``;
- ``modules/ui_extra_networks.py``: ``register_page``;
- ``modules/scripts.py``: ``Script``, ``AlwaysVisible``, ``scripts_data`` (for the X/Y/Z plot
  axes, ``xyz.py``); Forge only:
  ``Script.after_extra_networks_activate`` and ``process_before_every_sampling`` (called for
  always-visible scripts).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from . import library, settings, syntax, tools_tab
from .engine import Engine

PREFIX = "[QR-LoRA]"


def log(text: str) -> None:
    print(f"{PREFIX} {text}", flush=True)


def is_forge() -> bool:
    if "modules_forge" in sys.modules or "backend.patcher" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------- options
def register_options(shared) -> None:
    """Our settings in the host's Settings page (section "QR-LoRA"), like Lora's own."""
    try:
        import gradio as gr
    except ImportError:  # a host without gradio: the options still exist, with default widgets
        gr = None
    options = {}
    for s in settings.SETTINGS:
        component, args = None, None
        if gr is not None and s.kind == "choice":
            component, args = gr.Radio, {"choices": list(s.choices)}
        elif gr is not None and s.kind == "slider":
            component, args = gr.Slider, {"minimum": s.minimum, "maximum": s.maximum, "step": s.step}
        info = shared.OptionInfo(s.default, s.label, component, args)
        options[s.key] = info.info(s.info) if s.info and hasattr(info, "info") else info
    shared.options_templates.update(shared.options_section(settings.SECTION, options))


def folders(shared, opts: settings.Options) -> tuple:
    """(ΔR folder, basis cache folder) providers: the setting, else the command-line option."""
    models = getattr(shared, "models_path", None) or "models"
    cmd = getattr(shared, "cmd_opts", None)

    def qrlora_dir():
        return opts.text("qrlora_dir") or getattr(cmd, "qrlora_dir", None) or os.path.join(models, "QRLoRA")

    def basis_dir():
        return (opts.text("qrlora_basis_dir") or getattr(cmd, "qrlora_basis_dir", None)
                or os.path.join(models, "QRLoRA", "basis"))

    return qrlora_dir, basis_dir


# ----------------------------------------------------------------- the tag
def make_extra_network(extra_networks, adapter):
    class ExtraNetworkQRLora(extra_networks.ExtraNetwork):
        def __init__(self):
            super().__init__(syntax.TAG)

        def activate(self, p, params_list):
            adapter.activate(p, params_list)

        def deactivate(self, p):
            adapter.deactivate(p)

    return ExtraNetworkQRLora()


def make_script_class(scripts, adapter):
    """Forge's per-sampling hooks live on an always-visible script without UI."""

    class QRLoraScript(scripts.Script):
        sorting_priority = 50

        def title(self):
            return "QR-LoRA"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            return []

        def after_extra_networks_activate(self, p, *args, **kwargs):
            adapter.after_extra_networks_activate(p)

        def process_before_every_sampling(self, p, *args, **kwargs):
            adapter.process_before_every_sampling(p)

    return QRLoraScript


# ----------------------------------------------------------------- paste and API
def infotext_pasted(engine, params: dict) -> None:
    hashes = syntax.parse_hashes(params.get(syntax.INFOTEXT_KEY))
    if not hashes:
        return

    def name_for_hash(short: str):
        return engine.library.name_for_hash(short)

    for field in ("Prompt", "Hires prompt"):
        if isinstance(params.get(field), str):
            params[field] = syntax.rewrite_prompt(params[field], hashes, name_for_hash)


def add_api(engine, app) -> None:
    def list_qrloras():
        return [library.describe(e) for e in engine.library.entries()]

    def refresh_qrloras():
        return {"count": engine.library.refresh()}

    app.add_api_route("/sdapi/v1/qrloras", list_qrloras, methods=["GET"])
    app.add_api_route("/sdapi/v1/refresh-qrloras", refresh_qrloras, methods=["POST"])


# ----------------------------------------------------------------- setup
def setup():
    """Wire the extension into the running host; returns the Script class to expose (Forge) or None."""
    from modules import extra_networks, script_callbacks, scripts, shared

    opts = settings.Options(lambda key, default: getattr(shared.opts, key, default))
    register_options(shared)
    qrlora_dir, basis_dir = folders(shared, opts)

    def status(text: str) -> None:
        state = getattr(shared, "state", None)
        if state is not None:
            state.textinfo = text or None

    engine = Engine(opts, lambda: [qrlora_dir()], basis_dir, log=log, status=status)
    if getattr(shared, "state", None) is not None:  # the progress bar while a basis is computed
        from .bases import state_progress

        engine.resolver.progress = state_progress(shared.state)
    try:
        os.makedirs(qrlora_dir(), exist_ok=True)  # where users drop their files, as Lora does for models/Lora
    except OSError as e:
        log(f"cannot create {qrlora_dir()}: {e}")
    if is_forge():
        from .forge import ForgeAdapter

        try:
            from backend.args import dynamic_args
        except ImportError:
            dynamic_args = {}
        adapter = ForgeAdapter(engine, shared, dynamic_args, log=log)
        script_class = make_script_class(scripts, adapter)
    else:
        from .a1111 import A1111Adapter

        networks, network = sys.modules.get("networks"), sys.modules.get("network")
        if networks is None or not hasattr(networks, "loaded_networks") or not hasattr(network, "NetworkModule"):
            log("the built-in Lora extension is not loaded; <qrlora:…> needs it in Automatic1111")
            return None
        adapter = A1111Adapter(engine, networks, network, shared, log=log)
        script_class = None
    adapter.install()
    tag = make_extra_network(extra_networks, adapter)

    def before_ui():
        extra_networks.register_extra_network(tag)
        try:
            from modules import ui_extra_networks

            from .page import make_page

            ui_extra_networks.register_page(make_page(ui_extra_networks, engine, shared))
        except Exception as e:  # the page is optional; the tag must work regardless
            log(f"the Extra Networks page is unavailable: {e}")
        try:  # after every script has loaded: the X/Y/Z plot script is in scripts_data
            from . import xyz

            xyz.register(scripts, engine, log)
        except Exception as e:  # the axes are optional; the tag must work regardless
            log(f"the X/Y/Z plot axes are unavailable: {e}")

    script_callbacks.on_before_ui(before_ui)
    script_callbacks.on_infotext_pasted(lambda infotext, params: infotext_pasted(engine, params))
    script_callbacks.on_app_started(lambda demo, app: add_api(engine, app))
    script_callbacks.on_script_unloaded(adapter.uninstall)
    tools_tab.register(script_callbacks, qrlora_dir, basis_dir, log)  # the "QR-LoRA" tab (qrlora.ui)
    script_callbacks.on_cfg_denoiser(adapter.on_step)  # start=/stop= step windows, before each model call
    setup.engine, setup.adapter = engine, adapter  # for tests and debugging
    return script_class
