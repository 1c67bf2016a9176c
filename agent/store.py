"""The device's state directory: unpacked bundles and the `current`/`previous` links.

    STATE/bundles/<sha256>/   verified, unpacked, read-only
    STATE/current, previous   symlinks into bundles/, swapped atomically

A bundle directory only appears by an atomic rename after full verification, and a
link only changes by rename over the old one followed by a directory fsync, so a
crash at any instant leaves `current` pointing at a complete, verified bundle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundle import (
    Limits,
    Manifest,
    VerifiedBundle,
    bundle_digest,
    load_unpacked,
    remove_unpacked,
    unpack_bundle,
    verify_bundle,
)

log = logging.getLogger(__name__)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        # An interrupted unpack leaves a hidden temp dir; it was never referenced.
        for entry in self.bundles.iterdir():
            if entry.name.startswith(".unpack-"):
                log.info("removing interrupted unpack %s", entry.name)
                remove_unpacked(entry)
        for name in ("current", "previous"):
            tmp = self.root / f".{name}.tmp"
            if tmp.is_symlink():
                tmp.unlink()
        # A bundle directory no link names was never activated: its install was refused
        # or the agent died before the swap. Left there, a restart would meet it again
        # and reuse it instead of judging the bundle afresh from its file.
        for removed in self.gc():
            log.info("removing bundle %s, which neither current nor previous names", removed)

    def link(self, name: str) -> Path | None:
        path = self.root / name
        if not path.is_symlink():
            return None
        target = self.root / os.readlink(path)
        if not (target / "manifest.json").is_file():
            log.error("%s points at %s, which is not an unpacked bundle", name, target)
            return None
        return target

    def current(self) -> Path | None:
        return self.link("current")

    def previous(self) -> Path | None:
        return self.link("previous")

    def manifest(self, directory: Path) -> Manifest:
        return load_unpacked(directory)

    def install(
        self,
        bundle_path: Path,
        keys: Iterable[Ed25519PublicKey],
        limits: Limits,
    ) -> VerifiedBundle:
        """Verify and unpack into bundles/<sha256>/; reuse it when already there.

        The file is read twice at most: once for its digest (which names the
        directory), once to check and unpack (or only check, when already unpacked:
        the trusted keys may have changed since).
        """
        sha = bundle_digest(bundle_path, limits)
        dest = self.bundles / sha
        if (dest / "manifest.json").is_file():
            verified = verify_bundle(bundle_path, keys, limits, sha256=sha)
            verified.directory = dest
            return verified
        return unpack_bundle(bundle_path, dest, keys, limits, sha256=sha)

    def activate(self, directory: Path) -> None:
        """Make `directory` current; the old current becomes previous."""
        old = self.current()
        if old is not None and old.resolve() != directory.resolve():
            self._swap("previous", old)
        self._swap("current", directory)

    def rollback(self) -> Path:
        """Swap current and previous (the caller has validated previous)."""
        prev, cur = self.previous(), self.current()
        if prev is None:
            raise FileNotFoundError("there is no previous bundle to roll back to")
        self._swap("current", prev)
        if cur is not None:
            self._swap("previous", cur)
        return prev

    def _swap(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, self.root / name)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self, directory: Path) -> None:
        """Remove an unpacked bundle that failed validation (never current/previous)."""
        keep = {p.resolve() for p in (self.current(), self.previous()) if p is not None}
        if directory.resolve() in keep:
            return
        remove_unpacked(directory)

    def gc(self) -> list[str]:
        """Delete bundles neither current nor previous points at."""
        keep = {p.resolve() for p in (self.current(), self.previous()) if p is not None}
        removed = []
        for entry in self.bundles.iterdir():
            if entry.is_dir() and entry.resolve() not in keep and not entry.name.startswith("."):
                remove_unpacked(entry)
                removed.append(entry.name)
        return removed
