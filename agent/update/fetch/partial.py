"""The partial download ``STATE/incoming/<sha256>.part`` and its sidecars.

One owner (a `PartialFile`) for the bytes on disk of one fetch: it writes at
offsets, never past the signed size, turns a full disk into ``update.no_space``
with figures, hashes what a previous run left, and at the end either renames the
file to ``<sha256>.bundle`` (sha256 equal to the signed one) or removes it and its
sidecars (``update.hash_mismatch``). Sidecars sit beside the partial file and share
its name: ``.part.meta`` (HTTP validators, JSON) and ``.part.bitmap`` (MQTT chunks).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from agent.atomicfile import write_atomic
from agent.update.errors import UpdateCode, UpdateError

READ_BLOCK = 1 << 20
_FULL = (errno.ENOSPC, errno.EDQUOT)


def complete_path(partial: Path) -> Path:
    """Where a finished download goes: `<sha256>.part` -> `<sha256>.bundle`."""
    if partial.suffix == ".part":
        return partial.with_suffix(".bundle")
    return partial.with_name(partial.name + ".bundle")


def hash_file(path: Path, limit: int | None = None) -> tuple[hashlib._Hash, int]:
    """sha256 of the first `limit` bytes of `path` (all when None) and how many were read."""
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while limit is None or done < limit:
            want = READ_BLOCK if limit is None else min(READ_BLOCK, limit - done)
            block = f.read(want)
            if not block:
                break
            digest.update(block)
            done += len(block)
    return digest, done


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return -1


class PartialFile:
    """The bytes of one fetch on disk, at most `size` of them."""

    def __init__(self, path: Path, size: int, sha256: str) -> None:
        self.path = path
        self.size = size
        self.sha256 = sha256
        self.meta_path = path.with_name(path.name + ".meta")
        self.bitmap_path = path.with_name(path.name + ".bitmap")
        self._fd: int | None = None

    # ----------------------------------------------------------------- state on disk

    def length(self) -> int:
        """Bytes on disk now; a file longer than the signed size is not ours: start over."""
        try:
            n = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self.io_error("cannot read", exc) from exc
        if n > self.size:
            self.truncate()
            return 0
        return n

    def done_already(self) -> Path | None:
        """A complete file a previous run finished (renamed, then the agent stopped)."""
        final = complete_path(self.path)
        try:
            if final.stat().st_size != self.size:
                return None
            digest, _ = hash_file(final)
        except OSError:
            return None
        return final if digest.hexdigest() == self.sha256 else None

    def prefix_hash(self, length: int) -> hashlib._Hash:
        """sha256 of the first `length` bytes already on disk (a resumed download is
        hashed from disk once, then streamed on)."""
        try:
            digest, got = hash_file(self.path, length)
        except FileNotFoundError:
            digest, got = hashlib.sha256(), 0
        except OSError as exc:
            raise self.io_error("cannot read", exc) from exc
        if got != length:
            raise self.io_error("cannot read", OSError(f"only {got} of {length} bytes there"))
        return digest

    def load_meta(self) -> dict[str, Any]:
        """The sidecar JSON, or {} when missing, unreadable or for another download."""
        try:
            raw = json.loads(self.meta_path.read_bytes()[:65536])
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict) or raw.get("sha256") != self.sha256:
            return {}
        if raw.get("size") != self.size:
            return {}
        return raw

    def save_meta(self, **values: str | int | None) -> None:
        body = {"sha256": self.sha256, "size": self.size, **values}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # No fsync, as before: the validators only guard a resume (If-Range), and
            # `load_meta` reads a missing, empty or short file as {}. A resume without
            # them can at worst append another file's bytes, which the sha256 of the
            # whole file, checked before it is used, refuses (update.hash_mismatch).
            # 0o666 under the umask: what the plain write_text it replaced gave.
            write_atomic(
                self.meta_path,
                json.dumps(body, sort_keys=True).encode(),
                mode=0o666,
                fsync=False,
                fsync_dir=False,
            )
        except OSError as exc:
            raise self.io_error("cannot write", exc, self.meta_path) from exc

    # ----------------------------------------------------------------- writing

    def open(self) -> None:
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self.io_error("cannot open", exc) from exc

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset`; refuse (and write nothing) past the signed size."""
        if offset < 0 or offset + len(data) > self.size:
            raise UpdateError(
                UpdateCode.OVERSIZE,
                f"refused to write bytes {offset}-{offset + len(data)} of a bundle signed "
                f"as {self.size} bytes",
                size=self.size,
            )
        self.open()
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise self.io_error("cannot write", exc) from exc

    def sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise self.io_error("cannot write", exc) from exc

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)

    def truncate(self) -> None:
        """Start over: the bytes on disk (and the validators beside them) are not usable."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()

    def remove(self) -> None:
        self.truncate()
        with contextlib.suppress(FileNotFoundError):
            self.bitmap_path.unlink()

    def finish(self, digest: str, where: str) -> Path:
        """The whole file is there: check its sha256, then rename it to `<sha256>.bundle`."""
        self.close()
        if digest != self.sha256:
            self.remove()
            raise UpdateError(
                UpdateCode.HASH_MISMATCH,
                f"{where}: the downloaded {self.size} bytes have sha256 {digest}, the deploy "
                f"says {self.sha256}; the partial file was removed",
                got=digest,
                expected=self.sha256,
            )
        final = complete_path(self.path)
        try:
            os.replace(self.path, final)
        except OSError as exc:
            raise self.io_error("cannot rename", exc, final) from exc
        for side in (self.meta_path, self.bitmap_path):
            with contextlib.suppress(FileNotFoundError):
                side.unlink()
        return final

    # ----------------------------------------------------------------- errors

    def io_error(self, what: str, exc: OSError, path: Path | None = None) -> UpdateError:
        path = path or self.path
        on_disk = 0
        with contextlib.suppress(OSError):
            on_disk = self.path.stat().st_size
        if exc.errno in _FULL:
            free = _free_bytes(path)
            return UpdateError(
                UpdateCode.NO_SPACE,
                f"disk full: {what} {path} with {on_disk} of {self.size} bytes down and "
                f"{free} bytes free; free space under the state directory (the partial file "
                "is kept and resumed)",
                written=on_disk,
                size=self.size,
                free=free,
            )
        return UpdateError(
            UpdateCode.DOWNLOAD_FAILED,
            f"{what} {path}: {exc.strerror or exc}",
            written=on_disk,
            size=self.size,
        )


__all__ = ["PartialFile", "complete_path", "hash_file"]
