"""JSON from outside, parsed with its size, nesting and number forms bounded first.

`json.loads` recurses once per nesting level (100,000 levels is a RecursionError
traceback), silently keeps the last of duplicate keys (two readers of one signed
document could disagree), and takes `NaN`/`Infinity`, which are not JSON. Here
the nesting depth is measured by a linear scan before parsing, and the parse
refuses duplicates, non-finite numbers, absurdly long integers and lone
surrogates, each with a message that says what and where.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32
MAX_INT_DIGITS = 20
# A string runs to its closing quote or, unterminated, to the end of the text: the
# match never fails once started, so the scan is linear (a pattern that can fail
# is retried from every later quote, which is quadratic on `"\\"\\"\\...`).
_STRING = re.compile(r'"(?:[^"\\]|\\.|\\\Z)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonRefusedError(ValueError):
    """Not JSON, or JSON outside the bounds; the message names the rule."""


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, in linear time and without recursion."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub('""', text)).encode("ascii")
    if not brackets:
        return 0
    # Imported here: agent.protocol reads JSON through this module's hooks and must
    # import without numpy (the console does not install it).
    import numpy as np

    arr = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((arr == ord("[")) | (arr == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonRefusedError(f"key {key[:60]!r} appears twice in one object")
        out[key] = value
    return out


def refuse_constant(name: str) -> Any:
    raise JsonRefusedError(f"{name} is not a JSON number")


def finite_float(text: str) -> float:
    # "1e999" is not a NaN/Infinity literal, yet Python reads it as inf.
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefusedError(f"number {text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonRefusedError(
            f"integer of {len(text)} digits; the most a field can use is {MAX_INT_DIGITS}"
        )
    return int(text)


def loads(data: bytes, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON `data` (the caller has capped its size) or raise JsonRefusedError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefusedError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonRefusedError(f"{what} nests {depth} levels deep; the cap is {max_depth}")
    try:
        value = json.loads(
            text,
            object_pairs_hook=unique_keys,
            parse_constant=refuse_constant,
            parse_float=finite_float,
            parse_int=_int,
        )
    except JsonRefusedError as exc:
        raise JsonRefusedError(f"{what}: {exc}") from None
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise JsonRefusedError(f"{what} is not valid JSON: {exc}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefusedError(
            f"{what} has a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
        ) from None
    return value


__all__ = [
    "MAX_DEPTH",
    "JsonRefusedError",
    "finite_float",
    "loads",
    "nesting_depth",
    "refuse_constant",
    "unique_keys",
]
