"""Version strings of bundles and agents: dotted integers, optional pre-release and build.

    MAJOR[.MINOR[.PATCH[.BUILD]]][-prerelease][+build]      ASCII only, at most 64 chars

`-prerelease` orders before the plain release ("1.0.0-rc1" < "1.0.0"), pre-releases by
Semantic Versioning's rule ("1.0.0-rc.9" < "1.0.0-rc.10"); `+build`
metadata does not order at all ("1.0.0+b7" is the same version as "1.0.0", so
it is not newer). One rule, shared by the manifest, the version comparison and
every other place that takes a version from outside.
"""

from __future__ import annotations

import re

from agent.names import shown

VERSION_MAX = 64
# re.ASCII: `[0-9]` and not `\d`, which would take Arabic-Indic and other digits.
_VERSION = re.compile(
    r"(?P<nums>[0-9]{1,9}(?:\.[0-9]{1,9}){0,3})"
    r"(?:-(?P<pre>[0-9A-Za-z][0-9A-Za-z.-]{0,63}))?"
    r"(?:\+(?P<build>[0-9A-Za-z][0-9A-Za-z.-]{0,63}))?",
    re.ASCII,
)


class VersionFormatError(ValueError):
    pass


def parse_version(text: object) -> tuple[tuple[int, ...], str]:
    """Split "1.2.3-rc1+b7" into ((1, 2, 3, 0), "-rc1"); the build part is dropped."""
    m = (
        _VERSION.fullmatch(text)
        if isinstance(text, str) and len(text) <= VERSION_MAX and text.isascii()
        else None
    )
    if m is None:
        raise VersionFormatError(
            f"version {shown(text)} is not of the form "
            f"MAJOR[.MINOR[.PATCH[.BUILD]]][-prerelease][+build] (ASCII, at most {VERSION_MAX})"
        )
    numbers = tuple(int(p) for p in m.group("nums").split("."))
    pre = m.group("pre")
    return numbers + (0,) * (4 - len(numbers)), f"-{pre}" if pre else ""


def compare_versions(a: str, b: str) -> int:
    """Return -1, 0 or 1. A pre-release sorts before its release; build metadata is ignored."""
    na, sa = parse_version(a)
    nb, sb = parse_version(b)
    if na != nb:
        return -1 if na < nb else 1
    if sa == sb:
        return 0
    if not sa:
        return 1  # "1.0.0" > "1.0.0-rc1"
    if not sb:
        return -1
    ka, kb = _pre_key(sa[1:]), _pre_key(sb[1:])
    return 0 if ka == kb else (-1 if ka < kb else 1)


def _pre_key(pre: str) -> list[tuple[int, int, str]]:
    # Semantic Versioning's precedence: dot-separated identifiers, numeric ones compared
    # as numbers and before alphanumeric ones, so "rc.9" < "rc.10" < "rc.a".
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")]


__all__ = ["VERSION_MAX", "VersionFormatError", "compare_versions", "parse_version"]
