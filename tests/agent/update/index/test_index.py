"""The signed release index: signature, shape, expiry (freeze) and counter (rollback)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.canonical import canonical_json
from agent.signing import key_id
from agent.update.errors import UpdateCode, UpdateError
from agent.update.index import COUNTER_FILE, MAX_INDEX_BYTES, IndexGuard, parse_index
from tests.agent.update.index.conftest import NAME, release, signed


def _refused(data: bytes, key: Ed25519PrivateKey, code: str) -> str:
    with pytest.raises(UpdateError) as info:
        parse_index(data, [key.public_key()])
    assert info.value.code == code, info.value.message
    assert "Traceback" not in info.value.message
    return info.value.message


def _resign(doc: dict, key: Ed25519PrivateKey) -> bytes:
    doc["sig"] = base64.b64encode(key.sign(canonical_json(doc["signed"]))).decode()
    return json.dumps(doc).encode()


def test_a_signed_index_parses_and_resolves(key: Ed25519PrivateKey) -> None:
    data = signed(
        key, 3, release("1.0.0"), release("1.2.0"), release("1.10.0"), release("9.0.0", "other")
    )
    index = parse_index(data, [key.public_key()])
    assert index.counter == 3
    assert index.key_id == key_id(key.public_key())
    assert index.find(NAME, "1.2.0") == release("1.2.0")
    assert index.find(NAME, "9.0.0") is None  # another model's release
    newest = index.newest(NAME, "1.0.0", "1.0.0")
    assert newest is not None and newest.version == "1.10.0"  # versions compare, not strings
    assert index.newest(NAME, "1.10.0", "1.0.0") is None
    skipped = index.newest(NAME, "1.0.0", "1.0.0", skip={"1.10.0"})
    assert skipped is not None and skipped.version == "1.2.0"
    request = index.find(NAME, "1.2.0").deploy_request("twin")  # type: ignore[union-attr]
    assert (request.origin, request.version, request.name) == ("twin", "1.2.0", NAME)
    assert request.to_args()["url"] == release("1.2.0").url


def test_min_agent_version_filters_releases(key: Ed25519PrivateKey) -> None:
    data = signed(key, 1, release("2.0.0", min_agent_version="5.0.0"), release("1.5.0"))
    index = parse_index(data, [key.public_key()])
    newest = index.newest(NAME, "1.0.0", agent_version="1.0.0")
    assert newest is not None and newest.version == "1.5.0"
    newest = index.newest(NAME, "1.0.0", agent_version="5.0.0")
    assert newest is not None and newest.version == "2.0.0"


def test_signature_rules(key: Ed25519PrivateKey) -> None:
    data = signed(key, 1, release("1.0.0"))
    doc = json.loads(data)
    other = Ed25519PrivateKey.generate()
    assert "unsigned" in _refused(
        json.dumps({"signed": doc["signed"]}).encode(), key, UpdateCode.INDEX_INVALID
    )
    tampered = json.loads(data)
    tampered["signed"]["releases"][0]["size"] = 2000
    assert "not by any trusted key" in _refused(
        json.dumps(tampered).encode(), key, UpdateCode.INDEX_INVALID
    )
    by_other = _resign(json.loads(data), other)
    by_other_named = json.loads(by_other)
    by_other_named["key_id"] = key_id(other.public_key())
    message = _refused(json.dumps(by_other_named).encode(), key, UpdateCode.INDEX_INVALID)
    assert key_id(other.public_key()) in message and "not trusted" in message
    doc_no_kid = json.loads(by_other)
    del doc_no_kid["key_id"]
    _refused(json.dumps(doc_no_kid).encode(), key, UpdateCode.INDEX_INVALID)
    short = dict(doc, sig=base64.b64encode(b"x" * 10).decode())
    assert "64" in _refused(json.dumps(short).encode(), key, UpdateCode.INDEX_INVALID)
    with pytest.raises(UpdateError) as info:
        parse_index(data, [])
    assert info.value.code == UpdateCode.INDEX_INVALID and "update.index_keys" in info.value.message


def test_formatting_does_not_matter_but_content_does(key: Ed25519PrivateKey) -> None:
    doc = json.loads(signed(key, 1, release("1.0.0")))
    compact = json.dumps(doc, separators=(",", ":")).encode()
    assert parse_index(compact, [key.public_key()]).counter == 1


def test_expired_index_is_a_freeze_attack(key: Ed25519PrivateKey) -> None:
    data = signed(key, 1, release("1.0.0"), days=-1)
    message = _refused(data, key, UpdateCode.INDEX_EXPIRED)
    assert "expired" in message
    # An unsigned document learns nothing about expiry: signature comes first.
    doc = json.loads(data)
    doc["sig"] = base64.b64encode(b"\0" * 64).decode()
    _refused(json.dumps(doc).encode(), key, UpdateCode.INDEX_INVALID)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"schema": "edgerun.index/2"}, "schema"),
        ({"counter": -1}, "counter"),
        ({"counter": True}, "counter"),
        ({"counter": 1 << 60}, "counter"),
        ({"expires": "2099-01-01T00:00:00+02:00"}, "expires"),
        ({"expires": "2099-02-30T00:00:00Z"}, "real date"),
        ({"expires": 4102444800}, "expires"),
        ({"releases": {}}, "releases"),
        ({"extra": 1}, "unknown field"),
        ({"releases": [1]}, "releases[0]"),
        ({"releases": [{"name": "../x", "version": "1.0.0", "sha256": "a" * 64, "size": 1, "url": "https://h/x"}]}, "name"),
        ({"releases": [{"name": "m", "version": "one", "sha256": "a" * 64, "size": 1, "url": "https://h/x"}]}, "version"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "A" * 64, "size": 1, "url": "https://h/x"}]}, "sha256"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "a" * 64, "size": 0, "url": "https://h/x"}]}, "size"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "a" * 64, "size": "1", "url": "https://h/x"}]}, "size"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "a" * 64, "size": 1, "url": "file:///etc/passwd"}]}, "url"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "a" * 64, "size": 1, "url": "https://u:p@h/x"}]}, "credentials"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "a" * 64, "size": 1, "transfer": "t"}]}, "unknown field"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "a" * 64, "size": 1, "url": "https://h/x", "min_agent_version": "x"}]}, "min_agent_version"),
        ({"releases": [{"name": "m", "version": "1.0.0", "sha256": "a" * 64, "size": 1, "url": "https://h/x"}] * 2}, "twice"),
    ],
)  # fmt: skip
def test_malformed_signed_content_is_refused(
    key: Ed25519PrivateKey, change: dict, needle: str
) -> None:
    doc = json.loads(signed(key, 1, release("1.0.0")))
    doc["signed"].update(change)
    message = _refused(_resign(doc, key), key, UpdateCode.INDEX_INVALID)
    assert needle in message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"\xff\xfe",
        b'{"signed": {}, "signed": {}, "sig": "x"}',
        b"[" * 100 + b"]" * 100,
        b'{"signed": {"counter": NaN}, "sig": "x"}',
        b'{"sig": "x", "signed": 1, "key_id": "zz"}',
    ],
)
def test_malformed_documents_are_refused(key: Ed25519PrivateKey, data: bytes) -> None:
    _refused(data, key, UpdateCode.INDEX_INVALID)


def test_oversized_index_is_refused_before_parsing(key: Ed25519PrivateKey) -> None:
    message = _refused(b" " * (MAX_INDEX_BYTES + 1), key, UpdateCode.INDEX_INVALID)
    assert str(MAX_INDEX_BYTES) in message


def test_counter_only_grows_across_restarts(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    guard = IndexGuard(tmp_path, [key.public_key()])
    assert guard.seen() is None
    five = signed(key, 5, release("1.0.0"))
    assert guard.accept(five).counter == 5
    assert guard.accept(five).counter == 5  # the same index again is fine
    assert json.loads((tmp_path / COUNTER_FILE).read_text())["counter"] == 5
    # A fresh guard (an agent restart) remembers.
    guard = IndexGuard(tmp_path, [key.public_key()])
    with pytest.raises(UpdateError) as info:
        guard.accept(signed(key, 4, release("1.0.0"), release("1.1.0")))
    assert info.value.code == UpdateCode.INDEX_ROLLBACK and "lower than 5" in info.value.message
    with pytest.raises(UpdateError) as info:
        guard.accept(signed(key, 5, release("1.0.0"), release("0.9.0")))
    assert info.value.code == UpdateCode.INDEX_ROLLBACK and "other content" in info.value.message
    # A refused index does not move the counter; a newer one does.
    assert guard.seen() is not None and guard.seen()[0] == 5  # type: ignore[index]
    assert guard.accept(signed(key, 6, release("1.1.0"))).counter == 6
    # An expired index never moves the counter, even when its counter is higher.
    with pytest.raises(UpdateError) as info:
        guard.accept(signed(key, 99, release("1.1.0"), days=-1))
    assert info.value.code == UpdateCode.INDEX_EXPIRED
    assert guard.seen()[0] == 6  # type: ignore[index]


def test_a_damaged_counter_file_refuses_rather_than_forgets(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    (tmp_path / COUNTER_FILE).write_text('{"counter": "x"}')
    guard = IndexGuard(tmp_path, [key.public_key()])
    with pytest.raises(UpdateError) as info:
        guard.accept(signed(key, 1, release("1.0.0")))
    assert info.value.code == UpdateCode.INDEX_INVALID and COUNTER_FILE in info.value.message


def test_expiry_uses_the_guard_clock(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    data = signed(key, 1, release("1.0.0"), days=1)
    future = datetime.now(UTC) + timedelta(days=2)
    guard = IndexGuard(tmp_path, [key.public_key()], clock=lambda: future)
    with pytest.raises(UpdateError) as info:
        guard.accept(data)
    assert info.value.code == UpdateCode.INDEX_EXPIRED


def test_a_crashed_counter_write_leaves_nothing_at_the_next_start(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    from agent.atomicfile import temp_prefix

    leftover = tmp_path / f"{temp_prefix(tmp_path / COUNTER_FILE)}00ff00ff00ff00ff.tmp"
    leftover.write_text('{"half')
    IndexGuard(tmp_path, [key.public_key()])
    assert not leftover.exists()
