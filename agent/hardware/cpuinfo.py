"""The one reader of /proc/cpuinfo text: the first processor's fields, by lower-case key.

Both the agent's hardware fingerprint (agent.variants.fingerprint) and the build's
INT8 preset (export.pipeline.isa) read the CPU from here, so they agree on what the
CPU is. x86 lists `flags` and `model name` per processor; arm64 `Features`, `CPU
implementer` and `CPU part`; boards add machine-wide `Hardware` or `Model` lines after
the processor blocks. Every processor of one machine lists the same flags (the kernel
reports the system-wide capabilities), so the first one's are the machine's.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
DT_MODEL = Path("/proc/device-tree/model")  # Jetson and most ARM boards name themselves
_MAX_READ = 1 << 20  # a 256-core machine's cpuinfo is ~400 KB


def read_proc_text(path: Path) -> str:
    """The text of a small /proc or /sys file (at most 1 MB read), or "" where it cannot
    be read (a container, not Linux, no such device)."""
    try:
        with path.open("rb") as fh:
            return fh.read(_MAX_READ).decode("utf-8", "replace")
    except OSError:
        return ""


def read_cpuinfo(path: Path = CPUINFO) -> str:
    return read_proc_text(path)


def cpu_fields(text: str) -> dict[str, str]:
    """{lower-case key: value} of the first non-empty value of each `key : value` line,
    in the order the keys first appear (the first processor's block, then the rest)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if value and key not in fields:
            fields[key] = value
    return fields


def flag_set(fields: dict[str, str]) -> frozenset[str]:
    """The instruction-set flags: x86 `flags`, arm64 `Features`."""
    return frozenset((fields.get("flags") or fields.get("features") or "").split())


__all__ = ["CPUINFO", "DT_MODEL", "cpu_fields", "flag_set", "read_cpuinfo", "read_proc_text"]
