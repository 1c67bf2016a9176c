"""One agent per state directory: an exclusive flock on STATE/agent.lock.

Taken before anything touches the state dir or the API socket, held for the
process's lifetime and dropped by the kernel when it exits (also on SIGKILL), so
there is never a stale lock to clean up. The file holds the owner's pid, for the
message that refuses a second agent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path

from agent.regular_files import UnusableFileError, kind

LOCK_NAME = "agent.lock"
# check-config peeks at the lock with a momentary shared flock; an agent starting in
# that instant retries for this long instead of refusing itself.
_RETRY_S = 1.0


class StateDirLockedError(Exception):
    def __init__(self, state_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(
            f"another agent ({who}) is running on state_dir {state_dir}; "
            "stop it first, or give this one its own state_dir"
        )
        self.pid = pid


def _must_be_regular(fd: int, path: Path) -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise UnusableFileError(path, f"{path} is {kind(mode)}, not a regular file")


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    return None


class StateLock:
    """The held lock; `release()` (or process exit) lets the next agent in."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        """Lock `state_dir` (created if missing) or raise StateDirLockedError / OSError."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(path, flags, 0o644)
        try:
            _must_be_regular(fd, path)
            deadline = time.monotonic() + _RETRY_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StateDirLockedError(state_dir, _read_pid(fd)) from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        # The file stays: unlinking it would let a third agent lock a fresh inode
        # while a second one waits on the old.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder(state_dir: Path) -> int | None:
    """The pid of the agent holding `state_dir`'s lock (0 if unknown), None if free.

    Never creates anything: check-config must not touch the state dir.
    """
    try:
        # O_NONBLOCK: a FIFO planted as agent.lock must not hang check-config.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(state_dir / LOCK_NAME, flags)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    try:
        _must_be_regular(fd, state_dir / LOCK_NAME)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
