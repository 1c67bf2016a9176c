"""The console side of the release index: build and sign `index.json` from bundle files.

Each bundle is verified with the trusted keys first (a release that no device would
accept must not be published), its name and version come from its signed manifest,
its sha256 and size from the file, its URL from `base_url` + the file name. The
counter must grow with every published index (devices refuse a lower one): by
default it is one more than the counter of the index being replaced.

    edge-fleet index --key release.key --trust release.pub --base-url https://r.example/m/ \
        --out index.json --expires-days 30 models/*.edgebundle
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.atomicfile import write_atomic
from agent.bundle import verify_bundle
from agent.update.errors import UpdateError
from agent.update.index import Release, build_index, parse_index


def release_of(
    bundle: Path, base_url: str, keys: Iterable[Ed25519PublicKey], min_agent_version: str | None
) -> Release:
    verified = verify_bundle(bundle, keys)
    url = base_url.rstrip("/") + "/" + quote(bundle.name)
    return Release(
        name=verified.manifest.name,
        version=verified.manifest.version,
        sha256=verified.sha256,
        size=bundle.stat().st_size,
        url=url,
        min_agent_version=min_agent_version,
    )


def previous_counter(path: Path) -> int:
    """The counter of the index at `path` (-1 when there is none): the next must exceed it."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return -1
    counter = doc.get("signed", {}).get("counter") if isinstance(doc, dict) else None
    if isinstance(counter, bool) or not isinstance(counter, int):
        raise ValueError(f"{path} has no integer signed.counter; pass --counter")
    return counter


def write_index(
    out: Path,
    bundles: list[Path],
    base_url: str,
    key: Ed25519PrivateKey,
    trust: Iterable[Ed25519PublicKey],
    expires_in: timedelta,
    counter: int | None = None,
    min_agent_version: str | None = None,
    now: datetime | None = None,
) -> tuple[int, list[Release]]:
    keys = list(trust)
    releases = [release_of(b, base_url, keys, min_agent_version) for b in bundles]
    seen = previous_counter(out)
    if counter is None:
        counter = seen + 1
    elif counter <= seen:
        raise ValueError(f"--counter {counter} must exceed {seen}, the counter of {out}")
    expires = (now or datetime.now(UTC)) + expires_in
    data = build_index(releases, counter, expires, key)
    try:  # what a device would say: refuse to publish an index no device accepts
        parse_index(data, [key.public_key()], now)
    except UpdateError as exc:
        raise ValueError(exc.message) from None
    # Durable before it is said published: an index lost to a power cut would let the
    # next one reuse its counter with other content, which devices that saw it refuse.
    # 0o666 under the umask: what the plain write_bytes it replaced gave (it is public).
    write_atomic(out, data, mode=0o666)
    return counter, releases


__all__ = ["previous_counter", "release_of", "write_index"]
