"""QR-LoRA for Automatic1111 and Forge: the entry the WebUI loads from ``scripts/``.

The WebUI executes this file by path (``modules/script_loading.load_module``). Our own code
is loaded from the extension folder under private names (``qrlora_ext``, ``qrlora``),
never as the top-level ``extension`` / ``shared`` / ``trainer``, which other extensions may
already have put into ``sys.modules``. Everything else lives in ``extension/``.
"""

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_extension():
    path = os.path.join(_ROOT, "extension", "_bootstrap.py")
    spec = importlib.util.spec_from_file_location("qrlora_bootstrap", path)
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    package = bootstrap.load_package("qrlora_ext", os.path.join(_ROOT, "extension"))
    return importlib.import_module(package.__name__ + ".webui")


_webui = _load_extension()
# Forge keeps every extension folder on sys.path for the whole session (A1111 only while
# this file runs). Ours holds folders named shared/, extension/ and trainer/ that another
# extension's ``import shared`` must never find; everything of ours is already loaded by path.
sys.path[:] = [p for p in sys.path if not (p and os.path.realpath(p) == os.path.realpath(_ROOT))]
# Forge: the per-sampling hooks. The WebUI registers every Script subclass found in this
# module's namespace, so the class must be reachable under exactly one name.
QRLoraScript = _webui.setup()
if QRLoraScript is None:
    del QRLoraScript
