"""Load one of our packages from its folder under a private top-level name.

Standalone on purpose (no relative imports): ``scripts/qrlora.py`` executes this file by
path before any of our packages exist in ``sys.modules``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys


def _same_file(module, init: str) -> bool:
    path = getattr(module, "__file__", None) or ""
    return bool(path) and os.path.realpath(path) == os.path.realpath(init)


def load_package(alias: str, folder: str):
    """The package in ``folder`` as ``sys.modules[alias]`` (reused if already loaded from there).

    If ``alias`` is taken by something else (another copy of this extension, or anything
    else that chose the name), a name suffixed with a digest of the folder is used instead.
    """
    init = os.path.join(folder, "__init__.py")
    existing = sys.modules.get(alias)
    if existing is not None and not _same_file(existing, init):
        alias = f"{alias}_{hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:8]}"
        existing = sys.modules.get(alias)
    if existing is not None and _same_file(existing, init):
        return existing
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(alias, None)
        raise
    return module
