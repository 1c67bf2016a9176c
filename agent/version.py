"""Version strings of bundles and agents: dotted integers with an optional suffix."""

from __future__ import annotations

import re

_VERSION = re.compile(r"^(\d{1,9})(?:\.(\d{1,9})){0,3}(?:[-+][0-9A-Za-z.-]{1,64})?$")


class VersionFormatError(ValueError):
    pass


def parse_version(text: str) -> tuple[tuple[int, ...], str]:
    """Split "1.2.3-rc1" into ((1, 2, 3), "-rc1"); refuse anything else."""
    if not isinstance(text, str) or not _VERSION.match(text):
        raise VersionFormatError(
            f"version {text!r} is not of the form MAJOR[.MINOR[.PATCH[.BUILD]]][-suffix]"
        )
    head = re.split(r"[-+]", text, maxsplit=1)[0]
    suffix = text[len(head) :]
    numbers = tuple(int(p) for p in head.split("."))
    return numbers + (0,) * (4 - len(numbers)), suffix


def compare_versions(a: str, b: str) -> int:
    """Return -1, 0 or 1. A pre-release suffix ("-rc1") sorts before the plain release."""
    na, sa = parse_version(a)
    nb, sb = parse_version(b)
    if na != nb:
        return -1 if na < nb else 1
    if sa == sb:
        return 0
    # "1.0.0" > "1.0.0-rc1"; "+build" metadata does not order.
    pa = sa.startswith("-")
    pb = sb.startswith("-")
    if pa and not pb:
        return -1
    if pb and not pa:
        return 1
    return -1 if sa < sb else (1 if sa > sb else 0)
