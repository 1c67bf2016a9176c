"""The one rule for names, versions' characters and archive paths (ASCII only).

Model names, device ids and bundle member paths reach URLs, MQTT topics and the
file system, so they are checked here once, by the same code, wherever they come
from (a manifest, an MQTT command, the console). Every check is a full match on
ASCII text: no `$` that lets a trailing newline through, no `str.isalnum()` or
`\\d` that lets other scripts' letters and digits through.
"""

from __future__ import annotations

import re

NAME_MAX = 64
# A name starts with a letter or digit, so `.`, `..` and `-x` are never names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)

PATH_MAX = 200  # bytes; well under ustar's 255 and any file system's PATH_MAX below STATE
COMPONENT_MAX = 100  # bytes; under NAME_MAX of every file system we run on (255)
_COMPONENT = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)


class NameRuleError(ValueError):
    """A name or path that breaks the rule; the message says which rule."""


def shown(value: object, limit: int = 60) -> str:
    """repr() of an untrusted value, cut so a 1 MB string cannot flood a message."""
    # Only the head of a long string is repr()'d: a megabyte costs what a line does.
    if isinstance(value, str | bytes) and len(value) > 2 * limit:
        text, size = repr(value[: 2 * limit]), len(value)
    else:
        text = repr(value)
        if len(text) <= limit:
            return text
        size = len(text)
    return text[: limit - 5] + "...'" + f" ({size} chars)"


def is_name(text: object) -> bool:
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def check_name(text: object, what: str = "name") -> str:
    """Return `text` if it is a name (1-64 ASCII of A-Za-z0-9._-, first a letter or digit)."""
    if not is_name(text):
        raise NameRuleError(
            f"{what} {shown(text)} must be 1-{NAME_MAX} ASCII characters of A-Za-z0-9._- "
            "starting with a letter or digit"
        )
    assert isinstance(text, str)
    return text


def path_problem(path: object) -> str | None:
    """Why `path` is not a safe relative archive path, or None if it is one.

    The order matters for the message: the most specific reason first.
    """
    if not isinstance(path, str):
        return f"path {shown(path)} is {type(path).__name__}, not a string"
    if len(path) > 4 * PATH_MAX:  # say so before splitting a megabyte of text
        return f"path {shown(path)} is {len(path)} bytes; the cap is {PATH_MAX}"
    if not path or "\x00" in path or "\\" in path:
        return f"path {shown(path)} is empty or has NUL/backslash"
    if path.startswith("/"):
        return f"path {shown(path)} is an absolute path"
    parts = path.split("/")
    if ".." in parts:
        return f"path {shown(path)} climbs out with '..'"
    if "." in parts or "" in parts:
        return f"path {shown(path)} is not a normalized relative path"
    if not path.isascii() or not all(_COMPONENT.fullmatch(p) for p in parts):
        return f"path {shown(path)} has characters outside ASCII A-Za-z0-9._-"
    if len(path) > PATH_MAX:
        return f"path {shown(path)} is {len(path)} bytes; the cap is {PATH_MAX}"
    longest = max(parts, key=len)
    if len(longest) > COMPONENT_MAX:
        return f"path {shown(path)} has a {len(longest)}-byte component; the cap is {COMPONENT_MAX}"
    return None


__all__ = [
    "COMPONENT_MAX",
    "NAME_MAX",
    "PATH_MAX",
    "NameRuleError",
    "check_name",
    "is_name",
    "path_problem",
    "shown",
]
