"""Stand-in of modules/scripts.py: ``Script``, ``AlwaysVisible``, and the ScriptRunner hooks
QR-LoRA relies on.

A1111 v1.10 / Forge modules/scripts.py: ``Script.after_extra_networks_activate(p, *args,
**kwargs)``; Forge only: ``Script.process_before_every_sampling`` — ``ScriptRunner`` calls it
for ``alwayson_scripts`` only; ``load_scripts`` registers every ``Script`` subclass found in a
script module's ``__dict__``.
"""

import inspect
from collections import namedtuple

# A1111 v1.10 / Forge modules/scripts.py: every loaded script class, with the module it came from
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []


class AlwaysVisibleType:
    pass


AlwaysVisible = AlwaysVisibleType()


# A1111 v1.10 / Forge modules/scripts.py: Script


class Script:
    filename = None
    args_from = 0
    args_to = 0

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass


def script_classes(module):
    """What ``load_scripts.register_scripts_from_module`` would register from a script module."""
    return [c for c in module.__dict__.values() if inspect.isclass(c) and issubclass(c, Script)]


# A1111 v1.10 / Forge modules/scripts.py: ScriptRunner


class ScriptRunner:
    def __init__(self, scripts):
        self.alwayson_scripts = [s for s in scripts if s.show(False) is AlwaysVisible]
        self.scripts = list(scripts)

    def after_extra_networks_activate(self, p, **kwargs):
        for s in self.scripts:
            s.after_extra_networks_activate(p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        for s in self.alwayson_scripts:
            s.process_before_every_sampling(p, **kwargs)
