"""The core (the ``shared/`` folder) under the project's own name, ``qrlora``.

A1111 extensions commonly ``import modules.shared as shared``-style modules named
``shared``; Forge keeps every extension folder on ``sys.path``. We therefore never import
the top-level ``shared``: the sibling folder is loaded as ``qrlora`` by file path, the name
``pip install`` gives it too (an installed copy from the same folder is reused; one from
another folder keeps its name and ours gets a suffixed one).
"""

from __future__ import annotations

import importlib
import os

from ._bootstrap import load_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
package = load_package("qrlora", os.path.join(ROOT, "shared"))


def _sub(name: str):
    return importlib.import_module(f"{package.__name__}.{name}")


archs = _sub("archs")
checkpoint = _sub("checkpoint")
basis = _sub("basis")
deltar = _sub("deltar")
fusion = _sub("fusion")

FileFormatError = checkpoint.FileFormatError
