"""The signed release index: what a pull update or a KubeEdge desired version resolves through.

One file, ``index.json``, signed as a whole (TUF's "timestamp + targets" folded into one)::

    {"signed": {"schema": "edgerun.index/1", "counter": 42, "expires": "2026-12-31T00:00:00Z",
                "releases": [{"name": "resnet", "version": "1.2.0", "sha256": "<64 hex>",
                              "size": 123456, "url": "https://…/resnet-1.2.0.tar",
                              "min_agent_version": "0.8.0"}]},
     "sig": "<base64 ed25519 signature of canonical_json(signed)>", "key_id": "<16 hex>"}

The signature covers the canonical JSON of ``signed`` (agent/protocol/canonical.py: keys
sorted, no whitespace, UTF-8), so the signer's formatting does not matter. What is refused:

* unsigned, a bad signature, a key not in ``update.index_keys`` (else ``trust.public_keys``),
  anything malformed (duplicate keys, too deep, over ``MAX_INDEX_BYTES``, unknown fields, a
  release whose fields would not pass ``DeployRequest.from_args``) -> ``update.index_invalid``;
* ``expires`` in the past (a freeze attack: an attacker replays an old index forever so the
  device never hears of a fix) -> ``update.index_expired``;
* ``counter`` lower than the highest accepted before, or equal to it with other content (a
  rollback attack: an old, validly signed index that still lists a vulnerable release)
  -> ``update.index_rollback``. The highest counter and the digest of its content survive
  restarts in ``STATE/index-counter.json`` (written atomically).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.atomicfile import remove_stale_temps, write_atomic
from agent.names import is_name, shown
from agent.protocol.canonical import canonical_json
from agent.protocol.update import DeployRequest, HttpSource
from agent.signing import key_id
from agent.strictjson import JsonRefusedError
from agent.strictjson import loads as strict_loads
from agent.update.errors import UpdateCode, UpdateError
from agent.version import VersionFormatError, compare_versions, parse_version

SCHEMA = "edgerun.index/1"
MAX_INDEX_BYTES = 1 << 20  # an index of 1000 releases is ~300 KB
MAX_RELEASES = 1000
MAX_DEPTH = 6  # wrapper > signed > releases > release: 4 levels are used
MAX_COUNTER = (1 << 53) - 1  # exact in every JSON reader
COUNTER_FILE = "index-counter.json"
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
# "2026-12-31T00:00:00Z", optionally with fractions of a second; UTC only, so that two
# readers cannot disagree about a zone.
EXPIRES_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")
_RELEASE_KEYS = {"name", "version", "sha256", "size", "url", "min_agent_version"}
_SIGNED_KEYS = {"schema", "counter", "expires", "releases"}
_WRAPPER_KEYS = {"signed", "sig", "key_id"}


def _invalid(message: str) -> UpdateError:
    return UpdateError(UpdateCode.INDEX_INVALID, f"release index: {message}")


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    sha256: str
    size: int
    url: str
    min_agent_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "url": self.url,
        }
        if self.min_agent_version is not None:
            out["min_agent_version"] = self.min_agent_version
        return out

    def deploy_request(self, origin: Literal["twin", "poll"]) -> DeployRequest:
        """The deploy this release stands for, through the one parser of deploy args."""
        return DeployRequest.from_args(
            {
                "url": self.url,
                "sha256": self.sha256,
                "size": self.size,
                "version": self.version,
                "name": self.name,
            },
            origin=origin,
        )


@dataclass(frozen=True)
class ReleaseIndex:
    counter: int
    expires: datetime
    releases: tuple[Release, ...]
    digest: str  # sha256 of the canonical signed part: "same counter, same content"
    key_id: str  # the trusted key that signed it

    def find(self, name: str, version: str) -> Release | None:
        for release in self.releases:
            if release.name == name and release.version == version:
                return release
        return None

    def versions(self, name: str) -> list[str]:
        return [r.version for r in self.releases if r.name == name]

    def newest(
        self,
        name: str,
        newer_than: str | None,
        agent_version: str,
        skip: Iterable[str] = (),
    ) -> Release | None:
        """The newest release of `name` above `newer_than` this agent can run, not in `skip`."""
        skipped = set(skip)
        best: Release | None = None
        for release in self.releases:
            if release.name != name or release.version in skipped:
                continue
            if newer_than is not None and compare_versions(release.version, newer_than) <= 0:
                continue
            if not runs_on(release, agent_version):
                continue
            if best is None or compare_versions(release.version, best.version) > 0:
                best = release
        return best


def runs_on(release: Release, agent_version: str) -> bool:
    if release.min_agent_version is None:
        return True
    try:
        return compare_versions(agent_version, release.min_agent_version) >= 0
    except VersionFormatError:
        return False


def parse_index(
    data: bytes, keys: Iterable[Ed25519PublicKey], now: datetime | None = None
) -> ReleaseIndex:
    """Check `data` (signature, shape, expiry) and return the index; raises UpdateError
    (update.index_invalid / update.index_expired). The counter is checked by IndexGuard."""
    if len(data) > MAX_INDEX_BYTES:
        raise _invalid(f"{len(data)} bytes; the cap is {MAX_INDEX_BYTES} bytes")
    try:
        doc = strict_loads(data, "release index", max_depth=MAX_DEPTH)
    except JsonRefusedError as exc:
        raise UpdateError(UpdateCode.INDEX_INVALID, str(exc)) from None
    if not isinstance(doc, dict):
        raise _invalid('must be a JSON object {"signed": …, "sig": …, "key_id": …}')
    _only(doc, _WRAPPER_KEYS, "the top level")
    signed, sig, kid = doc.get("signed"), doc.get("sig"), doc.get("key_id")
    if sig is None:
        raise _invalid('unsigned: no "sig" (sign it with edge-fleet index)')
    if not isinstance(signed, dict):
        raise _invalid('"signed" must be an object')
    signer = _verify(signed, sig, kid, list(keys))
    _only(signed, _SIGNED_KEYS, '"signed"')
    if signed.get("schema") != SCHEMA:
        raise _invalid(f'"schema" must be {SCHEMA!r}, got {shown(signed.get("schema"))}')
    counter = signed.get("counter")
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter <= MAX_COUNTER:
        raise _invalid(
            f'"counter" must be an integer from 0 to {MAX_COUNTER}, got {shown(counter)}'
        )
    expires = parse_expires(signed.get("expires"))
    raw = signed.get("releases")
    if not isinstance(raw, list):
        raise _invalid(f'"releases" must be a list, got {shown(raw)}')
    if len(raw) > MAX_RELEASES:
        raise _invalid(f"{len(raw)} releases; the cap is {MAX_RELEASES}")
    releases = tuple(_release(i, entry) for i, entry in enumerate(raw))
    seen: set[tuple[str, str]] = set()
    for release in releases:
        key = (release.name, release.version)
        if key in seen:
            raise _invalid(f"release {release.name} {release.version} is listed twice")
        seen.add(key)
    # Expiry after the signature: an unsigned index must not learn what time we think it is.
    moment = now or datetime.now(UTC)
    if expires <= moment:
        raise UpdateError(
            UpdateCode.INDEX_EXPIRED,
            f"release index expired at {signed['expires']} (now {_iso(moment)}): the "
            "repository must publish a freshly signed index (an old one replayed is a freeze attack)",
            expires=signed["expires"],
        )
    digest = hashlib.sha256(canonical_json(signed)).hexdigest()
    return ReleaseIndex(counter, expires, releases, digest, signer)


def parse_expires(value: object) -> datetime:
    if not isinstance(value, str) or not EXPIRES_RE.fullmatch(value):
        raise _invalid(
            f'"expires" must be a UTC time like "2026-12-31T00:00:00Z", got {shown(value)}'
        )
    try:
        return datetime.fromisoformat(value[:-1] + "+00:00")
    except ValueError:
        raise _invalid(f'"expires" is not a real date: {shown(value)}') from None


def _only(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _invalid(
            f"unknown field(s) in {where}: {', '.join(shown(k) for k in unknown[:8])} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _verify(
    signed: Mapping[str, Any], sig: object, kid: object, keys: list[Ed25519PublicKey]
) -> str:
    if not isinstance(sig, str):
        raise _invalid('"sig" must be a base64 string')
    try:
        raw = base64.b64decode(sig.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _invalid(f'"sig" is not base64: {shown(sig)}') from None
    if len(raw) != 64:
        raise _invalid(f'"sig" decodes to {len(raw)} bytes; ed25519 needs 64')
    if kid is not None and (not isinstance(kid, str) or not KEY_ID_RE.fullmatch(kid)):
        raise _invalid(f'"key_id" must be 16 lowercase hex digits, got {shown(kid)}')
    if not keys:
        raise _invalid("no keys to check it with: set update.index_keys (or trust.public_keys)")
    candidates = keys if kid is None else [k for k in keys if key_id(k) == kid]
    if not candidates:
        trusted = ", ".join(key_id(k) for k in keys)
        raise _invalid(
            f"signed by key {kid}, which is not trusted (update.index_keys / "
            f"trust.public_keys hold {trusted})"
        )
    try:
        data = canonical_json(signed)
    except (ValueError, TypeError) as exc:
        raise _invalid(f'"signed" has no canonical form: {exc}') from None
    for key in candidates:
        try:
            key.verify(raw, data)
        except InvalidSignature:
            continue
        return key_id(key)
    raise _invalid(
        "the signature is not by any trusted key (update.index_keys / trust.public_keys)"
    )


def _release(i: int, entry: object) -> Release:
    where = f"releases[{i}]"
    if not isinstance(entry, dict):
        raise _invalid(f"{where} must be an object, got {shown(entry)}")
    _only(entry, _RELEASE_KEYS, where)
    name = entry.get("name")
    if not is_name(name):
        raise _invalid(f'{where}: "name" must be 1-64 of A-Za-z0-9._-, got {shown(name)}')
    assert isinstance(name, str)
    minimum = entry.get("min_agent_version")
    if minimum is not None:
        try:
            parse_version(minimum)
        except VersionFormatError as exc:
            raise _invalid(f'{where}: "min_agent_version": {exc}') from None
    args = {k: entry.get(k) for k in ("url", "sha256", "size", "version")}
    if not isinstance(args["url"], str):
        raise _invalid(f'{where}: "url" must be an http(s) URL, got {shown(args["url"])}')
    try:
        request = DeployRequest.from_args({**args, "name": name}, origin="poll")
    except UpdateError as exc:
        raise _invalid(f"{where} ({shown(name)}): {exc.message}") from None
    assert isinstance(request.source, HttpSource)
    return Release(name, request.version, request.sha256, request.size, request.source.url, minimum)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------- the counter


class IndexGuard:
    """The one owner of STATE/index-counter.json: accepts an index only if its counter
    grows (or is the same index again), then records it before anyone acts on it."""

    def __init__(
        self,
        state_dir: Path,
        keys: Iterable[Ed25519PublicKey],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.path = state_dir / COUNTER_FILE
        remove_stale_temps(self.path)  # built once at start: a leftover is a crash's
        self.keys = list(keys)
        self.clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()

    def seen(self) -> tuple[int, str] | None:
        """The highest counter accepted and its digest, or None before the first index."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _invalid(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            doc = strict_loads(data[:4096], str(self.path))
            counter, digest = doc["counter"], doc["digest"]
            if isinstance(counter, bool) or not isinstance(counter, int):
                raise TypeError(counter)
            if not isinstance(digest, str):
                raise TypeError(digest)
        except (JsonRefusedError, KeyError, TypeError):
            # Falling back to 0 would re-open the rollback attack; refusing keeps the
            # device on what it serves until a person looks.
            raise _invalid(
                f"{self.path} is damaged; the highest counter seen is unknown. Check the "
                "device, then remove the file to accept the repository's current index"
            ) from None
        return counter, digest

    def accept(self, data: bytes) -> ReleaseIndex:
        with self._lock:
            index = parse_index(data, self.keys, self.clock())
            seen = self.seen()
            if seen is not None:
                counter, digest = seen
                if index.counter < counter:
                    raise UpdateError(
                        UpdateCode.INDEX_ROLLBACK,
                        f"release index counter {index.counter} is lower than {counter}, the "
                        "highest accepted: an older index is refused (rollback attack)",
                        counter=index.counter,
                        seen=counter,
                    )
                if index.counter == counter and index.digest != digest:
                    raise UpdateError(
                        UpdateCode.INDEX_ROLLBACK,
                        f"release index counter {counter} was already accepted with other "
                        "content: a changed index must raise the counter",
                        counter=index.counter,
                        seen=counter,
                    )
                if index.counter == counter:
                    return index
            _write_atomic(self.path, {"counter": index.counter, "digest": index.digest})
            return index


def _write_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    # 0o644 (under the umask): the counter is no secret, and it always was readable.
    write_atomic(path, json.dumps(obj).encode(), mode=0o644)


# ---------------------------------------------------------------------- the writer side


def build_index(
    releases: Iterable[Release], counter: int, expires: datetime, private_key: Ed25519PrivateKey
) -> bytes:
    """A signed index.json (what fleet/releases.py writes; here so both sides share one form)."""
    signed = {
        "schema": SCHEMA,
        "counter": counter,
        "expires": _iso(expires),
        "releases": [r.to_json() for r in releases],
    }
    sig = base64.b64encode(private_key.sign(canonical_json(signed))).decode("ascii")
    doc = {"signed": signed, "sig": sig, "key_id": key_id(private_key.public_key())}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


__all__ = [
    "COUNTER_FILE",
    "MAX_INDEX_BYTES",
    "SCHEMA",
    "IndexGuard",
    "Release",
    "ReleaseIndex",
    "build_index",
    "parse_index",
    "runs_on",
]
