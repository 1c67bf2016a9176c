"""What a rollout says about its bundle: name, version, sha256 and size, read from the file.

With trusted keys (`deploy --trust release.pub`) the bundle is verified by every rule a
device applies (a bundle no device would accept is refused here, before any wave).
Without, the signed manifest is read for its name and version only: each device still
verifies the signature before it loads anything, so nothing unsafe runs, but a bad
bundle then fails the canary instead of the console.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import bundle_digest, parse_manifest, verify_bundle
from agent.bundle_errors import BundleError
from agent.signing import KeyFileError, load_public_key
from fleet.errors import FleetCode, FleetError


@dataclass(frozen=True, slots=True)
class BundleInfo:
    path: str
    name: str
    version: str
    sha256: str
    size: int
    verified: bool  # checked against trusted keys here (else only on the devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "verified": self.verified,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BundleInfo:
        return cls(
            path=str(doc["path"]),
            name=str(doc["name"]),
            version=str(doc["version"]),
            sha256=str(doc["sha256"]),
            size=int(doc["size"]),
            verified=bool(doc.get("verified", False)),
        )


def _refuse(path: Path, why: str) -> FleetError:
    return FleetError(FleetCode.BUNDLE, f"bundle {path}: {why}", path=str(path))


def inspect_bundle(path: str | Path, trust: Iterable[str | Path] = ()) -> BundleInfo:
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "no such file (give the .edgebundle to deploy)")
    trust = list(trust)
    try:
        sha = bundle_digest(path)
        size = path.stat().st_size
        if trust:
            try:
                keys = [load_public_key(Path(k)) for k in trust]
            except KeyFileError as exc:
                raise FleetError(FleetCode.BAD_INPUT, f"--trust: {exc}") from None
            verified = verify_bundle(path, keys, sha256=sha)
            return BundleInfo(
                str(path), verified.manifest.name, verified.manifest.version, sha, size, True
            )
        manifest = parse_manifest(_manifest_bytes(path))
    except BundleError as exc:
        raise _refuse(path, f"[{exc.code}] {exc}") from None
    except OSError as exc:
        raise _refuse(path, f"cannot read it: {exc.strerror or exc}") from None
    return BundleInfo(str(path), manifest.name, manifest.version, sha, size, False)


def _manifest_bytes(path: Path) -> bytes:
    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.getmember("manifest.json")
            if not member.isfile() or member.size > 1 << 20:
                raise _refuse(path, "manifest.json is not a small regular file")
            fh = tar.extractfile(member)
            assert fh is not None
            data = fh.read()
    except (tarfile.TarError, KeyError):
        raise _refuse(path, "not a bundle (no manifest.json in a tar archive)") from None
    try:
        json.loads(data)
    except ValueError:
        raise _refuse(path, "manifest.json is not JSON") from None
    return data
