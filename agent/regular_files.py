"""Open files named by configuration without ever blocking on them.

A path in agent.toml (the config itself, a key, `model.bundle`) may name a FIFO, a
directory or a device: a plain open() of a FIFO waits for a writer forever, and
reading /dev/zero never ends. Opening with O_NONBLOCK and checking fstat() first
turns those into a refusal that says what the path is.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnusableFileError(OSError):
    """The path exists but is not a regular file, or is larger than allowed."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(errno.EINVAL, reason, str(path))


def kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> int:
    """A read-only descriptor on `path`, which must be a regular file (after symlinks)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnusableFileError(path, f"is {kind(mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: Path) -> None:
    """Raise OSError (UnusableFileError for the wrong kind) unless `path` can be read."""
    os.close(open_regular(path))


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The whole file, refused (UnusableFileError) when over `max_bytes`."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        too_big = f"is larger than the {max_bytes // 1024} KiB a file of this kind may have"
        if size > max_bytes:
            raise UnusableFileError(path, too_big)
        data = fh.read(max_bytes + 1)  # the size may change under us
        if len(data) > max_bytes:
            raise UnusableFileError(path, too_big)
        return data
