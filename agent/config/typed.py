"""Build frozen dataclasses from plain dicts, rejecting unknown keys and wrong types.

Every problem is collected with its dotted key path, so `edge-agent check-config`
can print all of them at once instead of failing on the first.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


# Stable codes of a refused config (DESIGN.md "Error codes"): the file cannot be read,
# is not TOML, or a value is wrong (unknown key, type, range, pattern, cross-field).
UNREADABLE = "config.unreadable"
SYNTAX = "config.syntax"
INVALID = "config.invalid"


class ConfigError(Exception):
    def __init__(
        self, issues: list[ConfigIssue], source: str = "config", code: str = INVALID
    ) -> None:
        self.issues = issues
        self.source = source
        self.code = code
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source} has {len(issues)} problem(s):\n{lines}")


def constraint(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    le: float | None = None,
    pattern: str | None = None,
    help: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with bounds or a pattern checked by the loader."""
    meta = {"ge": ge, "le": le, "pattern": pattern, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# Values are echoed back in messages; a hostile one (megabytes of text, a list nested
# a thousand deep) must not become a megabyte message or a RecursionError.
_SHOW = reprlib.Repr()
_SHOW.maxlevel = 3
_SHOW.maxstring = 80
_SHOW.maxother = 80
_SHOW.maxlist = _SHOW.maxdict = _SHOW.maxtuple = 6


def show(value: Any) -> str:
    """A short, printable rendering of a config value for messages."""
    return _SHOW.repr(value)


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else str(bound)


def allowed_range(ge: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f"allowed: {_number(ge)} to {_number(le)}"
    if ge is not None:
        return f"allowed: {_number(ge)} or more"
    if le is not None:
        return f"allowed: {_number(le)} or less"
    return "allowed: any finite number"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "table"
    if tp is type(None):
        return "nothing"
    return getattr(tp, "__name__", str(tp))


class _Builder:
    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []

    def fail(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(path, message))

    def build(self, cls: type[T], data: Any, path: str) -> T | None:
        if not isinstance(data, Mapping):
            self.fail(path, f"expected a table, got {type(data).__name__}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in fields:
                allowed = ", ".join(sorted(fields))
                self.fail(_join(path, _key(key)), f"unknown key; allowed keys here: {allowed}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            sub = _join(path, name)
            if name in data:
                value = self.convert(hints[name], data[name], sub, f.metadata)
                if value is _INVALID:
                    continue
                self.check_constraints(f, value, sub)
                values[name] = value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(sub, f"required key is missing ({_type_name(hints[name])})")
        try:
            return cls(**values)
        except TypeError:
            return None

    def check_constraints(self, f: dataclasses.Field[Any], value: Any, path: str) -> None:
        meta = f.metadata
        ge, le, pattern = meta.get("ge"), meta.get("le"), meta.get("pattern")
        if isinstance(value, int | float) and not isinstance(value, bool):
            where = allowed_range(ge, le)
            if ge is not None and value < ge:
                self.fail(path, f"{show(value)} is below the minimum {ge} ({where})")
            if le is not None and value > le:
                self.fail(path, f"{show(value)} is above the maximum {le} ({where})")
        if pattern is not None and isinstance(value, str) and not re.fullmatch(pattern, value):
            self.fail(path, f"{show(value)} does not match {pattern}")

    def convert(self, tp: Any, value: Any, path: str, meta: Mapping[str, Any] | None = None) -> Any:
        origin = get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            args = get_args(tp)
            if value is None and type(None) in args:
                return None
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) == 1:
                return self.convert(non_none[0], value, path, meta)
            for arg in non_none:
                trial = _Builder()
                out = trial.convert(arg, value, path, meta)
                if out is not _INVALID and not trial.issues:
                    return out
            self.fail(path, f"expected {_type_name(tp)}, got {show(value)}")
            return _INVALID
        if origin is Literal:
            allowed = get_args(tp)
            if value not in allowed:
                choices = ", ".join(repr(a) for a in allowed)
                self.fail(path, f"{show(value)} is not allowed; choose one of {choices}")
                return _INVALID
            return value
        if origin is list:
            if not isinstance(value, list):
                self.fail(path, f"expected {_type_name(tp)}, got {type(value).__name__}")
                return _INVALID
            (item_tp,) = get_args(tp)
            items = [self.convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
            return _INVALID if any(i is _INVALID for i in items) else items
        if origin is dict:
            if not isinstance(value, Mapping):
                self.fail(path, f"expected {_type_name(tp)}, got {type(value).__name__}")
                return _INVALID
            _, val_tp = get_args(tp)
            out = {str(k): self.convert(val_tp, v, _join(path, str(k))) for k, v in value.items()}
            return _INVALID if any(v is _INVALID for v in out.values()) else out
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            built = self.build(tp, value, path)
            return _INVALID if built is None else built
        if tp is bool:
            if isinstance(value, bool):
                return value
            self.fail(path, f"expected true or false, got {show(value)}")
            return _INVALID
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            self.fail(path, f"expected an integer, got {show(value)}")
            return _INVALID
        if tp is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                try:
                    number = float(value)
                except OverflowError:  # an integer beyond any float
                    number = math.inf
                if not math.isfinite(number):
                    # NaN compares false with every bound, so it is refused here, for
                    # every float field, or it slips through ge/le unnoticed.
                    meta = meta or {}
                    where = allowed_range(meta.get("ge"), meta.get("le"))
                    self.fail(path, f"{show(value)} is not a finite number ({where})")
                    return _INVALID
                return number
            self.fail(path, f"expected a number, got {show(value)}")
            return _INVALID
        if tp is str or tp is Path:
            what = "a string" if tp is str else "a path string"
            if not isinstance(value, str) or (tp is Path and not value):
                self.fail(path, f"expected {what}, got {show(value)}")
                return _INVALID
            if "\x00" in value:
                # No file name or setting has one; the OS would refuse it deep inside.
                self.fail(path, f"{show(value)} has a NUL character, which no setting allows")
                return _INVALID
            return value if tp is str else Path(value)
        raise TypeError(f"config type {tp!r} at {path} is not supported")  # programming error


_INVALID: Any = object()


def _key(key: Any) -> str:
    # An unknown key is echoed back; a hostile one could be huge or carry escapes.
    text = str(key)
    return text if len(text) <= 80 and text.isprintable() else show(text)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# A hostile file can hold a million wrong items; a person needs the first few dozen.
MAX_ISSUES = 50


def build(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build `cls` from `data` or raise ConfigError listing every problem (up to 50)."""
    builder = _Builder()
    result = builder.build(cls, data, "")
    if builder.issues or result is None:
        issues = builder.issues or [ConfigIssue("", "invalid")]
        if len(issues) > MAX_ISSUES:
            more = len(issues) - MAX_ISSUES
            issues = [*issues[:MAX_ISSUES], ConfigIssue("", f"... and {more} more problem(s)")]
        raise ConfigError(issues, source)
    return result


def coerce_env(tp: Any, text: str) -> Any:
    """Turn an environment string into the TOML-ish value a field of type `tp` expects."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in get_args(tp) if a is not type(None)]
        if text == "" and len(non_none) < len(get_args(tp)):
            return None
        tp = non_none[0]
        origin = get_origin(tp)
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return text
    if tp is int:
        try:
            return int(text)
        except ValueError:
            return text
    if tp is float:
        try:
            return float(text)
        except ValueError:
            return text
    if origin is list:
        return [coerce_env(get_args(tp)[0], part.strip()) for part in text.split(",") if part]
    return text
