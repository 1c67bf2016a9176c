"""Free disk space for a job, checked before it starts: refused with the figures.

A deploy needs room for the download (what is not already in `STATE/incoming/`), for
the unpacked bundle (a bundle is an uncompressed tar, so its members take at most its
size) and `update.reserve_disk_mb` left over for the rest of the device (the outbox,
logs). What stays afterwards (current + previous) is already on disk and counted in
what is used.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.update.errors import UpdateCode, UpdateError

MB = 1024 * 1024


@dataclass(frozen=True)
class SpaceNeed:
    download: int  # bytes still to fetch
    unpack: int  # bytes the unpacked bundle takes
    reserve: int  # bytes kept free for the rest of the device

    @property
    def total(self) -> int:
        return self.download + self.unpack + self.reserve


def need_for(size: int, partial: Path, reserve_mb: int) -> SpaceNeed:
    try:
        have = partial.stat().st_size
    except OSError:
        have = 0
    return SpaceNeed(max(0, size - have), size, reserve_mb * MB)


def check_space(directory: Path, need: SpaceNeed) -> int:
    """Return the free bytes; raise update.no_space when `need` does not fit."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise UpdateError(
            UpdateCode.NO_SPACE, f"cannot read the free space of {directory}: {exc.strerror}"
        ) from exc
    if free < need.total:
        raise UpdateError(
            UpdateCode.NO_SPACE,
            f"not enough free disk in {directory}: {free / MB:.1f} MB free, "
            f"{need.total / MB:.1f} MB needed (download {need.download / MB:.1f} MB + unpack "
            f"{need.unpack / MB:.1f} MB + update.reserve_disk_mb {need.reserve / MB:.0f} MB)",
            free_mb=round(free / MB, 1),
            need_mb=round(need.total / MB, 1),
            download_mb=round(need.download / MB, 1),
            unpack_mb=round(need.unpack / MB, 1),
            reserve_mb=round(need.reserve / MB, 1),
        )
    return free


__all__ = ["SpaceNeed", "check_space", "need_for"]
