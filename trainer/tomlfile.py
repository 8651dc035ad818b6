"""Reading TOML: ``tomllib`` on Python 3.11+, the ``toml`` package on 3.10; syntax errors
become a ConfigError that names the file, line and column."""

from __future__ import annotations

import re
import sys
from typing import Any

from .schema import ConfigError

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # Python 3.10: the third-party ``toml`` package, imported when first needed
    _toml = None


_TOMLLIB_POS = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)\s*$")


def parse_toml(text: str, source: str) -> dict:
    """Parse TOML; a syntax error becomes a ConfigError naming file, line and column."""
    loads = _toml.loads if _toml is not None else _toml_package().loads
    try:
        return loads(text)
    except Exception as e:  # tomllib.TOMLDecodeError / toml.TomlDecodeError
        line = getattr(e, "lineno", None)
        col = getattr(e, "colno", None)
        msg = getattr(e, "msg", None) or str(e)
        m = _TOMLLIB_POS.match(str(e))
        if m:
            msg, line, col = m.group(1), int(m.group(2)), int(m.group(3))
        if line is None:
            raise ConfigError([f"invalid TOML: {msg}"], source) from None
        raise ConfigError([f"line {line}, column {col}: invalid TOML: {msg}"], source) from None


def _toml_package():
    try:
        import toml
    except ImportError:
        raise ConfigError(["reading TOML on Python 3.10 needs the 'toml' package: pip install toml"]) from None
    return toml


def load_toml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read {path}: {e}"]) from None
    return parse_toml(text, path)


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value if it parses as one, else the plain string."""
    try:
        return parse_toml(f"v = {text}", "--set")["v"]
    except ConfigError:
        return text
