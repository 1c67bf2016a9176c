"""Replace a small state file whole: a reader or a crash sees the old bytes or the new, never a mix.

The one writer behind the agent's JSON state files (update journal, index counter,
twin desired values, variant choice) and the download sidecars. The bytes go to a
temporary file in the same directory (so the rename never crosses a filesystem),
created with O_EXCL under a name no one else uses (a leftover or a planted link is
never written through, and two writers of one file never share a temporary), then
fsynced, renamed over the target and the directory fsynced, so after a power cut the
name holds the new content (once this returns) or the old one. Any failure removes
the temporary file and raises the OSError; what it means is the caller's to say.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

_TMP_SUFFIX = ".tmp"
_TRIES = 8  # name clashes of 64 random bits only come from a planted file


def temp_prefix(path: Path) -> str:
    """The name every temporary file of `path` starts with (hidden, beside it)."""
    return f".{path.name}."


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    fsync: bool = True,
    fsync_dir: bool = True,
) -> None:
    """Replace `path` with `data`.

    `mode` is the new file's permission bits, filtered by the umask as os.open does
    (0o666 gives what a plain open() would). `fsync=False` skips the file's fsync and
    `fsync_dir=False` the directory's: then a power cut may leave the old content,
    or with fsync off even an empty or short file, so only a caller that can lose
    the write (and reads a short file as missing) turns them off.
    """
    fd, tmp = _create(path, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync_dir:
        fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the names in `directory` (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove temporary files of `path` a crash left behind; the removed ones.

    Only for an owner that knows no write of `path` is in flight (at its start, under
    its lock): it would remove a running writer's file too, failing that write.
    """
    prefix = temp_prefix(path)
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(_TMP_SUFFIX):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def _create(path: Path, mode: int) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    for attempt in range(_TRIES):
        tmp = path.with_name(f"{temp_prefix(path)}{secrets.token_hex(8)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            if attempt == _TRIES - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["fsync_directory", "remove_stale_temps", "temp_prefix", "write_atomic"]
