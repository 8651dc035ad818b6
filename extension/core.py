"""The core (``shared/``) under a private name, whatever owns the top-level name ``shared``.

A1111 extensions commonly ``import modules.shared as shared``-style modules named
``shared``; Forge keeps every extension folder on ``sys.path``. We therefore never import
the top-level ``shared``: the sibling folder is loaded as ``qrlora_shared`` by file path.
"""

from __future__ import annotations

import importlib
import os

from ._bootstrap import load_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
package = load_package("qrlora_shared", os.path.join(ROOT, "shared"))


def _sub(name: str):
    return importlib.import_module(f"{package.__name__}.{name}")


archs = _sub("archs")
checkpoint = _sub("checkpoint")
basis = _sub("basis")
deltar = _sub("deltar")

FileFormatError = checkpoint.FileFormatError
