"""Stand-in of modules/shared.py + modules/options.py (A1111 v1.10 / Forge).

- ``OptionInfo(default, label, component, component_args, onchange, section, refresh, ...)``
  with ``.info()``; ``options_section(section, dict)`` stamps the section on each option;
- ``options_templates`` *is* ``opts.data_labels`` (the same dict), so options added at script
  load exist in ``--nowebui`` mode; ``Options.__getattr__``: saved value, else the registered
  default, else AttributeError;
- ``cmd_opts`` (argparse namespace; preload adds ``--qrlora-dir``/``--qrlora-basis-dir``),
  ``state.textinfo`` / ``sampling_step`` / ``sampling_steps``, ``sd_model``, ``models_path``.
"""

import argparse

from modules import paths


# A1111 v1.10 / Forge modules/options.py: OptionInfo


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.comment_after = comment_after
        self.do_not_save = False

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


# A1111 v1.10 / Forge modules/options.py: options_section


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        v.section = section_identifier[0:2]
        if len(section_identifier) == 3:
            v.category_id = section_identifier[2]
    return options_dict


# A1111 v1.10 / Forge modules/options.py: Options


class Options:
    def __init__(self, data_labels):
        object.__setattr__(self, "data_labels", data_labels)
        object.__setattr__(self, "data", {k: v.default for k, v in data_labels.items()})

    def __setattr__(self, key, value):
        if key in self.data or key in self.data_labels:
            self.data[key] = value
            return
        object.__setattr__(self, key, value)

    def __getattr__(self, item):
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        labels = object.__getattribute__(self, "data_labels")
        if item in labels:
            return labels[item].default
        raise AttributeError(item)


class State:
    textinfo = None
    interrupted = False
    sampling_step = 0  # set by the sampler's callback_state after each step
    sampling_steps = 0


models_path = paths.models_path
options_templates = {
    "samples_format": OptionInfo("png", "File format for images"),
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
}
opts = Options(options_templates)
cmd_opts = argparse.Namespace(lora_dir="", nowebui=False)
state = State()
sd_model = None
