"""A small typed schema for TOML tables: every problem found, each with its path, in one error.

kohya validates with voluptuous and shows its raw messages; its ``--config_file`` is not
checked at all. Here a field declares its type, default and help once, validation walks the
whole table and collects *every* problem (unknown keys with a did-you-mean, wrong types,
missing required keys) so a user fixes a config in one round trip.

Section dataclasses declare their fields with :func:`option`; :func:`schema_of` turns the
dataclass into a :class:`Schema`. kohya's dataset levels use plain :class:`Field` lists.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from qrlora.errors import UserError


class ConfigError(UserError):
    """Every problem found in a config, each naming its path. ``problems`` is the list."""

    def __init__(self, problems: Iterable[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return head + self.problems[0]
        lines = [f"{head}{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class CliValue:
    """A value given on the command line (``--set k=v``): parsed as TOML, with the raw text
    kept so that a string field still gets ``2024`` as the string "2024"."""

    def __init__(self, parsed: Any, raw: str):
        self.parsed, self.raw = parsed, raw


def show(value: Any) -> str:
    """A value as the user wrote it, for messages (TOML spelling)."""
    if isinstance(value, CliValue):
        return show(value.parsed)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table" if value else "{}"
    if isinstance(value, list):
        inner = ", ".join(show(v) for v in value[:6])
        return f"[{inner}{', ...' if len(value) > 6 else ''}]"
    return repr(value)


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def where(path: str) -> str:
    return f"in {path}" if path else "at the top level"


def suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass
class Context:
    """What a validation pass carries: the problems so far and where relative paths start."""

    errors: list[str]
    base_dir: str | None = None


class Invalid(Exception):
    """Raised by a type's ``convert``: what was expected, and an optional hint to append."""

    def __init__(self, expected: str, hint: str = ""):
        super().__init__(expected)
        self.expected, self.hint = expected, hint


# --------------------------------------------------------------------------------- types


class Type:
    expected = "a value"
    takes_str = False  # whether a string is a valid value (CliValue falls back to raw text)

    def convert(self, value: Any, path: str, ctx: Context) -> Any:
        raise NotImplementedError

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        """``convert``, turning a mismatch into one problem; returns None after a problem."""
        if isinstance(value, CliValue):
            if isinstance(value.parsed, str) or not self.takes_str:
                value = value.parsed
            else:  # a string field given ``--set k=2024`` wants "2024"
                try:
                    return self.convert(value.parsed, path, Context([], ctx.base_dir))
                except Invalid:
                    value = value.raw
        try:
            return self.convert(value, path, ctx)
        except Invalid as e:
            ctx.errors.append(f"{path}: expected {e.expected}, got {show(value)}{e.hint}")
            return None


def _bounds(kind: str, lo, hi, lo_open=False, hi_open=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return kind + (" " + " and ".join(parts) if parts else "")


class Bool(Type):
    expected = "true or false"

    def convert(self, value, path, ctx):
        if not isinstance(value, bool):  # 0/1 are not booleans: TOML has true/false
            raise Invalid(self.expected)
        return value


class Int(Type):
    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max
        self.expected = _bounds("an integer", min, max)

    def convert(self, value, path, ctx):
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(self.expected)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise Invalid(self.expected)
        return value


class Float(Type):
    """A number; integers are accepted (``lr = 1`` means 1.0) and returned as float."""

    def __init__(self, min=None, max=None, min_open=False, max_open=False, keep_int=False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open
        self.keep_int = keep_int  # return ints unchanged (a step count vs a fraction)
        self.expected = _bounds("a number", min, max, min_open, max_open)

    def convert(self, value, path, ctx):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(self.expected)
        lo_bad = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        hi_bad = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if lo_bad or hi_bad or value != value:  # value != value: NaN
            raise Invalid(self.expected)
        return value if (self.keep_int and isinstance(value, int)) else float(value)


class Str(Type):
    takes_str = True

    def __init__(self, nonempty: bool = False, pattern: str | None = None, expected: str | None = None):
        self.nonempty, self.pattern = nonempty, pattern
        self.expected = expected or ("a non-empty string" if nonempty else "a string")

    def convert(self, value, path, ctx):
        if not isinstance(value, str) or (self.nonempty and not value.strip()):
            raise Invalid(self.expected)
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise Invalid(self.expected)
        return value


class PathT(Str):
    """A filesystem path; ``~`` is expanded and a relative path is taken against the folder
    of the file that declared it (``ctx.base_dir``). Values starting with one of
    ``keep_prefixes`` (``builtin:``) are names, not paths, and stay as written."""

    def __init__(self, keep_prefixes: tuple[str, ...] = ()):
        super().__init__(nonempty=True, expected="a path (a non-empty string)")
        self.keep_prefixes = keep_prefixes

    def convert(self, value, path, ctx):
        value = super().convert(value, path, ctx)
        if value.startswith(self.keep_prefixes) if self.keep_prefixes else False:
            return value
        value = os.path.expanduser(value)
        if ctx.base_dir is not None and not os.path.isabs(value):
            value = os.path.join(ctx.base_dir, value)
        return os.path.normpath(value)


class Enum(Type):
    takes_str = True

    def __init__(self, *choices: str, ignore_case: bool = False):
        self.choices, self.ignore_case = choices, ignore_case
        self.expected = "one of " + ", ".join(repr(c) for c in choices)

    def convert(self, value, path, ctx):
        if isinstance(value, str):
            for c in self.choices:
                if value == c or (self.ignore_case and value.lower() == c.lower()):
                    return c
            raise Invalid(self.expected, suggest(value, self.choices))
        raise Invalid(self.expected)


class StrList(Type):
    expected = "a list of strings"

    def convert(self, value, path, ctx):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Invalid(self.expected)
        return list(value)


class StrOrList(Type):
    """A string or a list of strings (kept as given: the caller knows what each means)."""

    expected = "a string or a list of strings"
    takes_str = True

    def convert(self, value, path, ctx):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise Invalid(self.expected)


class Pair(Type):
    """Two numbers ``[a, b]``; with ``scalar_ok`` a single number ``n`` means ``[n, n]``
    (kohya's ``resolution = 512``). Returned as a tuple."""

    def __init__(self, item: Type, scalar_ok: bool = False, names: tuple[str, str] = ("a", "b")):
        self.item, self.scalar_ok = item, scalar_ok
        pair = f"[{names[0]}, {names[1]}]"
        noun = "integer" if isinstance(item, Int) else "number"
        article = "an" if noun == "integer" else "a"
        self.expected = f"{article} {noun} or {pair}" if scalar_ok else f"{pair} (two {noun}s)"

    def convert(self, value, path, ctx):
        items = value if isinstance(value, list) else [value] if self.scalar_ok else None
        if items is None or len(items) != (2 if isinstance(value, list) else 1):
            raise Invalid(self.expected)
        try:
            out = tuple(self.item.convert(v, path, ctx) for v in items)
        except Invalid:
            bounds = _bounds("", getattr(self.item, "min", None), getattr(self.item, "max", None)).strip()
            kinds = int if isinstance(self.item, Int) else (int, float)
            right_type = all(isinstance(v, kinds) and not isinstance(v, bool) for v in items)
            raise Invalid(f"{self.expected}, each {bounds}" if bounds and right_type else self.expected) from None
        return out * 2 if len(out) == 1 else out


class AnyTable(Type):
    """A free-form table (``optimizer_args``); values pass through unchecked."""

    expected = "a table"

    def convert(self, value, path, ctx):
        if not isinstance(value, dict):
            raise Invalid(self.expected)
        return {k: (v.parsed if isinstance(v, CliValue) else v) for k, v in value.items()}


class Table(Type):
    """A nested table with its own schema."""

    expected = "a table"

    def __init__(self, schema: "Schema"):
        self.schema = schema

    def convert(self, value, path, ctx):
        if not isinstance(value, dict):
            raise Invalid(self.expected)
        return self.schema.validate(value, path, ctx)


class Section(Type):
    """A nested table declared by a dataclass of :func:`option` fields; returns an instance."""

    expected = "a table"

    def __init__(self, cls: type, hints: dict[str, str] | None = None):
        self.cls, self.schema = cls, schema_of(cls, hints)

    def convert(self, value, path, ctx):
        if not isinstance(value, dict):
            raise Invalid(self.expected)
        values = self.schema.validate(value, path, ctx)
        return self.cls(**{k: v for k, v in values.items() if v is not None or self.schema.fields[k].default is None})


# --------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Field:
    name: str
    type: Type
    default: Any = None
    required: bool = False
    help: str = ""
    kohya: str = ""  # kohya's name for this option ("" when kohya has none), for the reference


class Schema:
    """The fields of one table. ``hints`` maps known-but-misplaced keys (a dataset option
    inside a subset, a kohya argument name) to a sentence that replaces "unknown key"."""

    def __init__(self, fields: Iterable[Field], hints: dict[str, str] | None = None):
        self.fields = {f.name: f for f in fields}
        self.hints = dict(hints or {})

    def validate(self, data: Any, path: str, ctx: Context, fill_defaults: bool = True) -> dict:
        """Checked values: every field when ``fill_defaults``, else only the keys present."""
        if not isinstance(data, dict):
            ctx.errors.append(f"{path or 'the config'}: expected a table, got {show(data)}")
            return {}
        out: dict[str, Any] = {}
        for key, value in data.items():
            field = self.fields.get(key)
            if field is None:
                ctx.errors.append(unknown_key(key, path, self.fields, self.hints))
                continue
            out[key] = field.type.check(value, join(path, key), ctx)
        for name, field in self.fields.items():
            if name in data:
                continue
            if field.required:
                ctx.errors.append(f"{join(path, name)} is required")
            elif fill_defaults:
                out[name] = _copy(field.default)
        return out


def unknown_key(key: str, path: str, fields: Iterable[str], hints: dict[str, str]) -> str:
    """The message for a key not in ``fields``: a hint if it is known elsewhere, else the
    closest field name, else the closest key known elsewhere, with its hint."""
    if key in hints:
        return f"{join(path, key)}: {hints[key]}"
    msg = f"unknown key {key!r} {where(path)}"
    near = suggest(key, fields)
    if near:
        return msg + near
    close = difflib.get_close_matches(key, list(hints), n=1, cutoff=0.75)
    return msg + (f"; did you mean {close[0]!r}? ({close[0]!r} {hints[close[0]]})" if close else "")


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def option(type: Type, default: Any = None, *, required: bool = False, help: str = "", kohya: str = "") -> Any:
    """A dataclass field that also declares its schema (see :func:`schema_of`); ``kohya`` is
    kohya's name for the same option, when it has one."""
    spec = {"type": type, "required": required, "help": help, "default": default, "kohya": kohya}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata={"schema": spec})
    return dataclasses.field(default=default, metadata={"schema": spec})


def schema_of(cls: type, hints: dict[str, str] | None = None) -> Schema:
    fields = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("schema")
        if spec is not None:
            fields.append(Field(f.name, spec["type"], spec["default"], spec["required"], spec["help"], spec["kohya"]))
    return Schema(fields, hints)


def describe(schema: Schema, title: str) -> str:
    """Markdown reference of a schema's fields (for docs and ``--help-config``)."""
    lines = [f"### {title}", "", "| key | type | default | kohya name | meaning |", "|---|---|---|---|---|"]
    for f in schema.fields.values():
        plain = f.default is None or dataclasses.is_dataclass(f.default)
        default = "(required)" if f.required else ("" if plain else show(f.default))
        kohya = f"`{f.kohya}`" if f.kohya else "-"
        lines.append(f"| `{f.name}` | {f.type.expected} | {default} | {kohya} | {f.help} |")
    return "\n".join(lines)
