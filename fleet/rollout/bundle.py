"""What a rollout records about its bundle: name, version, sha256 and size, verified.

The bundle is verified with the release's trusted public keys (`deploy --trust
release.pub`, or `trust = [...]` in fleet.toml's `[rollout]`) by every rule a device
applies (fleet.bundle_source.inspect_bundle): a bundle no device would accept is
refused before any wave starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.signing import KeyFileError, load_public_key
from fleet.errors import FleetCode, FleetError


@dataclass(frozen=True, slots=True)
class BundleInfo:
    path: str
    name: str
    version: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BundleInfo:
        return cls(
            path=str(doc["path"]),
            name=str(doc["name"]),
            version=str(doc["version"]),
            sha256=str(doc["sha256"]),
            size=int(doc["size"]),
        )


def trust_keys(paths: Iterable[str | Path]) -> list[Ed25519PublicKey]:
    keys = []
    for p in paths:
        try:
            keys.append(load_public_key(Path(p)))
        except KeyFileError as exc:
            raise FleetError(FleetCode.BAD_INPUT, f"--trust: {exc}") from None
    if not keys:
        raise FleetError(
            FleetCode.BUNDLE,
            "no release public key to verify the bundle with: pass --trust release.pub "
            '(or set trust = ["release.pub"] in the [rollout] table of fleet.toml)',
        )
    return keys


def inspect_bundle(path: str | Path, keys: Iterable[Ed25519PublicKey | str | Path]) -> BundleInfo:
    """Verify the bundle file with the trusted keys (keys, or their PEM files);
    FleetError(console.bundle) naming what is wrong."""
    from fleet.bundle_source import inspect_bundle as verify

    given = list(keys)
    files = [k for k in given if isinstance(k, str | Path)]
    loaded = [k for k in given if isinstance(k, Ed25519PublicKey)]
    keys = loaded + (trust_keys(files) if files else [])
    if not keys:
        trust_keys([])  # raises, saying how to give one
    path = Path(path)
    if not path.is_file():
        raise FleetError(
            FleetCode.BUNDLE, f"bundle {path}: no such file (give the .edgebundle to deploy)"
        )
    info = verify(path, list(keys))
    return BundleInfo(str(path.resolve()), info.name, info.version, info.sha256, info.size)
