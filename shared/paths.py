"""Where qrlora keeps files between runs."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$QRLORA_CACHE``, else ``~/.cache/qrlora``."""
    return os.environ.get("QRLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qrlora")


def basis_cache_dir() -> str:
    """The shared basis cache: ``<cache root>/basis``."""
    return os.path.join(cache_root(), "basis")
