"""Stand-in of modules/script_callbacks.py (A1111 v1.10 / Forge): the ``on_*`` registrations
QR-LoRA uses and the ``*_callback`` runners the host calls.

``before_ui_callback`` runs after ``initialize_rest`` cleared the extra-network registries,
also with ``--nowebui``; ``infotext_pasted_callback(infotext, params)``;
``app_started_callback(demo, app)``; ``script_unloaded_callback()``;
``model_loaded_callback(sd_model)``; ``cfg_denoiser_callback(params)`` with a
``CFGDenoiserParams``, from ``CFGDenoiser.forward`` before each model call. Each runner catches and reports a callback's exception;
``before_ui`` and ``script_unloaded`` run in reverse registration order.
"""

from collections import defaultdict

callback_map = defaultdict(list)


def clear_callbacks():
    callback_map.clear()


def _add(kind, fn):
    callback_map[kind].append(fn)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback)


def on_infotext_pasted(callback, *, name=None):
    _add("infotext_pasted", callback)


def on_app_started(callback, *, name=None):
    _add("app_started", callback)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback)


def on_model_loaded(callback, *, name=None):
    _add("model_loaded", callback)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback)


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback)


# A1111 v1.10 / Forge modules/script_callbacks.py: CFGDenoiserParams


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step  # shared.state.sampling_step: the last finished step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser  # the CFGDenoiser (its step, steps, total_steps, p)


def _run(kind, *args, reverse=False):
    from modules import errors

    callbacks = list(callback_map[kind])
    for fn in reversed(callbacks) if reverse else callbacks:
        try:
            fn(*args)
        except Exception as e:
            errors.display(e, f"{kind} callback")


# A1111 v1.10 / Forge modules/script_callbacks.py: before_ui_callback


def before_ui_callback():
    _run("before_ui", reverse=True)


# A1111 v1.10 / Forge modules/script_callbacks.py: infotext_pasted_callback


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


# A1111 v1.10 / Forge modules/script_callbacks.py: app_started_callback


def app_started_callback(demo, app):
    _run("app_started", demo, app)


# A1111 v1.10 / Forge modules/script_callbacks.py: script_unloaded_callback


def script_unloaded_callback():
    _run("script_unloaded", reverse=True)


# A1111 v1.10 / Forge modules/script_callbacks.py: cfg_denoiser_callback


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)
