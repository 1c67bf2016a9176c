"""Hostile release indexes and twin values (issue 8, "Signed release metadata").

Generated at run time, judged by the real parts:

* every index case through a real ``IndexGuard`` on a state dir of its own (seeded with
  a counter where the case is about rollback): the code comes from the UpdateError;
* every index case again served by a real HTTP server to ``PullUpdates`` (the bounded
  GET, the guard, the resolver) with a recording UpdateService: the code comes from the
  ``update.pull_refused`` event, and nothing may have been deployed;
* twin values (wrong types, over 512 bytes, not a version, unknown versions) through the
  real twin decoder and the resolver.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import twin
from agent.protocol.canonical import canonical_json
from agent.protocol.messages import Code, ProtocolError
from agent.protocol.update import DeployRequest, RollbackRequest
from agent.signing import key_id
from agent.update.errors import UpdateCode, UpdateError
from agent.update.index import COUNTER_FILE, MAX_INDEX_BYTES, SCHEMA, IndexGuard
from agent.update.poll import PullUpdates
from agent.update.repository import Repository, http_getter
from tests.hostile import Case, Outcome, timed

SIGNATURE = "index.signature"
SHAPE = "index.shape"
FREEZE = "index.freeze"
ROLLBACK = "index.rollback"
RELEASE = "index.release"
TWIN = "index.twin"
CLASSES = (SIGNATURE, SHAPE, FREEZE, ROLLBACK, RELEASE, TWIN)
CLASS = SHAPE
NAME = "digits"
INVALID = (UpdateCode.INDEX_INVALID,)
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def _release(version: str = "2.0.0", **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": NAME,
        "version": version,
        "sha256": "ab" * 32,
        "size": 4096,
        "url": f"https://releases.example/{NAME}-{version}.edgebundle",
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()


def _signed(
    counter: int = 10, days: float = 30, releases: list[Any] | None = None
) -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"schema": SCHEMA, "counter": counter, "expires": expires,
            "releases": [_release()] if releases is None else releases}  # fmt: skip


def _wrap(signed: Any, key: Ed25519PrivateKey | None = KEY, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"signed": signed}
    if key is not None:
        doc["sig"] = base64.b64encode(key.sign(canonical_json(signed))).decode()
        doc["key_id"] = key_id(key.public_key())
    doc.update(extra)
    return json.dumps(doc).encode()


# (class, name, index bytes, seeded (counter, digest-of) or None, expected codes)
IndexCase = tuple[str, str, bytes, int | None, tuple[str, ...]]


def _index_cases() -> Iterator[IndexCase]:
    good = _signed()
    yield SIGNATURE, "unsigned", _wrap(good, None), None, INVALID
    yield SIGNATURE, "wrong-key", _wrap(good, OTHER), None, INVALID
    yield SIGNATURE, "wrong-key-no-id", _wrap(good, OTHER, key_id=None), None, INVALID
    yield (
        SIGNATURE,
        "wrong-key-claims-trusted-id",
        _wrap(good, OTHER, key_id=key_id(KEY.public_key())),
        None,
        INVALID,
    )
    doc = json.loads(_wrap(good))
    for i, sig in enumerate(
        [
            "",
            "!!!",
            base64.b64encode(b"\0" * 64).decode(),
            base64.b64encode(b"x" * 63).decode(),
            7,
            None,
            [doc["sig"]],
        ]
    ):
        yield SIGNATURE, f"bad-sig-{i}", json.dumps({**doc, "sig": sig}).encode(), None, INVALID
    for i, kid in enumerate(["", "XYZ", 5, "0" * 17]):
        yield (
            SIGNATURE,
            f"bad-key-id-{i}",
            json.dumps({**doc, "key_id": kid}).encode(),
            None,
            INVALID,
        )
    for field_, value in [("counter", 11), ("expires", "2099-01-01T00:00:00Z"), ("releases", [])]:
        tampered = json.loads(_wrap(good))
        tampered["signed"][field_] = value
        yield SIGNATURE, f"tampered-{field_}", json.dumps(tampered).encode(), None, INVALID
    tampered = json.loads(_wrap(good))
    tampered["signed"]["releases"][0]["url"] = "https://evil.example/x"
    yield SIGNATURE, "tampered-url", json.dumps(tampered).encode(), None, INVALID
    # Shape: the wrapper and the signed part.
    for i, raw in enumerate(
        [
            b"",
            b"null",
            b"[]",
            b'"x"',
            b"\xff\xfe{}",
            b"{" * 5000,
            b"[" * 40 + b"]" * 40,
            b'{"signed": {}, "signed": {}}',
            b'{"signed": 1, "sig": NaN}',
            b'{"signed": {"counter": 1e999}, "sig": "x"}',
            b'{"a": "\\ud800"}',
            b" " * (MAX_INDEX_BYTES + 1),
            b'{"signed": {"counter": 1' + b"0" * 40 + b'}, "sig": "x"}',
        ]
    ):
        yield SHAPE, f"not-an-index-{i}", raw, None, INVALID
    yield SHAPE, "extra-wrapper-field", _wrap(good, KEY, extra=1), None, INVALID
    for i, change in enumerate(
        [
            {"schema": "edgerun.index/0"},
            {"schema": None},
            {"counter": -1},
            {"counter": "10"},
            {"counter": True},
            {"counter": 2**53},
            {"counter": 1.5},
            {"releases": None},
            {"releases": "x"},
            {"releases": [None]},
            {"releases": [_release()] * 1001},
            {"more": 1},
            {"sig": "x"},
        ]
    ):
        yield SHAPE, f"signed-shape-{i}", _wrap({**good, **change}), None, INVALID
    deep = {**good, "releases": [_release(name={"a": {"b": {"c": [[[]]]}}})]}
    yield SHAPE, "deep-release", _wrap(deep), None, INVALID
    dup = _wrap(good).replace(b'"schema":', b'"counter": 99, "schema":', 1)
    yield SHAPE, "duplicate-key-in-signed", dup, None, INVALID
    # Freeze: expired, or an expiry that is not a UTC time.
    for days in (-1, -0.0001, -3650):
        yield (
            FREEZE,
            f"expired-{days}d",
            _wrap(_signed(days=days)),
            None,
            (UpdateCode.INDEX_EXPIRED,),
        )
    for i, expires in enumerate(
        [
            "2099-01-01",
            "2099-01-01T00:00:00",
            "2099-01-01T00:00:00+00:00",
            "2099-13-01T00:00:00Z",
            "tomorrow",
            4102444800,
            None,
            "2099-01-01T00:00:00.1234567Z",
        ]
    ):
        yield FREEZE, f"bad-expires-{i}", _wrap({**good, "expires": expires}), None, INVALID
    # Rollback: a counter lower than seen, or equal with other content.
    yield ROLLBACK, "older-counter", _wrap(_signed(counter=9)), 10, (UpdateCode.INDEX_ROLLBACK,)
    yield ROLLBACK, "counter-zero", _wrap(_signed(counter=0)), 10, (UpdateCode.INDEX_ROLLBACK,)
    yield (
        ROLLBACK,
        "same-counter-other-content",
        _wrap(_signed(releases=[_release("3.0.0")])),
        10,
        (UpdateCode.INDEX_ROLLBACK,),
    )
    # Releases: every field wrong in several ways.
    bad_fields: dict[str, list[Any]] = {
        "name": ["", "../etc", "a" * 65, "x y", 5, None, _DROP, "é"],
        "version": [
            "",
            "v1",
            "1.0.0.0.0.0.0.0.0.0.0",
            "1..0",
            2,
            None,
            _DROP,
            "1.0.0-" + "a" * 200,
        ],
        "sha256": ["", "AB" * 32, "ab" * 31, "zz" * 32, 5, None, _DROP],
        "size": [0, -1, 2**41, "4096", 1.5, True, None, _DROP],
        "url": [
            "",
            "ftp://h/x",
            "file:///etc/shadow",
            "https://",
            "https://u:p@h/x",
            "https://h/" + "a" * 2100,
            "https://h/a b",
            "https://h/\x00",
            5,
            None,
            _DROP,
            "javascript:alert(1)",
        ],
        "min_agent_version": ["", "x", 1],
    }
    for field_, values in bad_fields.items():
        for i, value in enumerate(values):
            entry = _release(**{field_: value})
            yield RELEASE, f"{field_}-{i}", _wrap({**good, "releases": [entry]}), None, INVALID
    yield (
        RELEASE,
        "transfer-source",
        _wrap({**good, "releases": [_release(transfer="t1")]}),
        None,
        INVALID,
    )
    yield (
        RELEASE,
        "unknown-field",
        _wrap({**good, "releases": [_release(mode="hot")]}),
        None,
        INVALID,
    )
    yield (
        RELEASE,
        "same-version-twice",
        _wrap({**good, "releases": [_release(), _release(sha256="cd" * 32)]}),
        None,
        INVALID,
    )


def _guard_outcome(
    work: Path, klass: str, name: str, data: bytes, seeded: int | None, expect: tuple[str, ...]
) -> Outcome:
    state = work / f"guard-{klass}-{name}"
    state.mkdir(parents=True)
    guard = IndexGuard(state, [KEY.public_key()])
    if seeded is not None:
        guard.accept(_wrap(_signed(counter=seeded)))
    before = (state / COUNTER_FILE).read_bytes() if seeded is not None else None

    def judge() -> tuple[str | None, str]:
        try:
            guard.accept(data)
        except UpdateError as exc:
            after = (state / COUNTER_FILE).read_bytes() if (state / COUNTER_FILE).exists() else None
            if after != before:
                return None, "a refused index moved the counter"
            return exc.code, exc.message
        return None, "accepted"

    return timed(Case(klass, f"guard-{name}", expect), judge)


class _Recorder:
    def __init__(self) -> None:
        self.deploys: list[DeployRequest] = []

    def deploy(self, request: DeployRequest) -> dict[str, Any]:
        self.deploys.append(request)
        return {"job": "j", "accepted": True}

    def rollback(self, request: RollbackRequest) -> dict[str, Any]:
        raise AssertionError("no rollback here")

    def status(self) -> dict[str, Any]:
        return {"job": None, "bad_versions": []}

    def cancel(self) -> dict[str, Any]:
        raise AssertionError("no cancel here")


@contextmanager
def _server(files: dict[str, bytes]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path, b"")
            self.send_response(200 if self.path in files else 404)
            if self.path != "/endless":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/endless":  # no length, more than the cap
                chunk = b" " * 65536
                try:
                    for _ in range(MAX_INDEX_BYTES // len(chunk) + 4):
                        self.wfile.write(chunk)
                except OSError:
                    pass
                return
            with contextlib.suppress(OSError):  # the agent stopped reading at its cap
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _pull(
    work: Path, url: str, seeded: int | None
) -> tuple[PullUpdates, _Recorder, list[dict[str, Any]]]:
    state = work / f"pull-{len(list(work.iterdir()))}"
    state.mkdir()
    guard = IndexGuard(state, [KEY.public_key()])
    if seeded is not None:
        guard.accept(_wrap(_signed(counter=seeded)))
    events: list[dict[str, Any]] = []

    def emit(kind: str, reason: str, **data: Any) -> None:
        events.append({"kind": kind, "reason": reason, **data})

    service = _Recorder()
    pull = PullUpdates(Repository(url, guard, http_getter(5, 5, 2)), service,
                       lambda: (NAME, "1.0.0"), emit, poll_s=60, agent_version="1.0.0")  # fmt: skip
    return pull, service, events


def _pull_judge(
    pull: PullUpdates, service: _Recorder, events: list[dict[str, Any]]
) -> Callable[[], tuple[str | None, str]]:
    def judge() -> tuple[str | None, str]:
        pull.check_once()
        if service.deploys:
            return None, f"deployed {service.deploys[0].version}"
        refused = [e for e in events if e["kind"] == "update.pull_refused"]
        if not refused:
            return None, "no refusal event"
        return str(refused[-1]["code"]), str(refused[-1]["reason"])

    return judge


def _twin_cases(work: Path, base: str) -> list[Outcome]:
    outcomes = []
    for i, value in enumerate([5, None, True, ["1.0.0"], {"v": 1}, "9" * 600, "é" * 300]):
        payload = json.dumps(
            {"event_id": "e", "timestamp": 1, "delta": {"model_version": value}}
        ).encode()

        def judge(payload: bytes = payload, value: object = value) -> tuple[str | None, str]:
            try:
                doc = twin.decode(payload)
            except ProtocolError as exc:
                return exc.code, exc.message
            if doc.desired().get("model_version") is None and value is None:
                return Code.MALFORMED, "a null desired value is no desire (ignored)"
            return None, "accepted"

        outcomes.append(timed(Case(TWIN, f"twin-value-{i}", (Code.MALFORMED,)), judge))
    for i, (value, code) in enumerate(
        [
            ("not a version", UpdateCode.BAD_ARGS),
            ("v2", UpdateCode.BAD_ARGS),
            ("9.9.9", UpdateCode.NO_SUCH_VERSION),
            ("2.0.0-rc.1", UpdateCode.NO_SUCH_VERSION),
            ("3.0.0", UpdateCode.NO_SUCH_VERSION),  # listed, but for another model,
        ]
    ):
        pull, service, events = _pull(work, f"{base}/good.json", None)
        pull.want(value)
        outcomes.append(
            timed(Case(TWIN, f"twin-desired-{i}", (code,)), _pull_judge(pull, service, events))
        )
    return outcomes


def run_corpus(workdir: Path) -> list[Outcome]:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    cases = list(_index_cases())
    outcomes = [_guard_outcome(work, *case) for case in cases]
    pulls = work / "pulls"
    pulls.mkdir()
    files = {f"/{i}.json": case[2] for i, case in enumerate(cases)}
    files["/endless"] = b""
    files["/good.json"] = _wrap(_signed(releases=[_release("2.0.0"), _release("3.0.0", name="m2")]))
    with _server(files) as base:
        for i, (klass, name, _, seeded, expect) in enumerate(cases):
            pull, service, events = _pull(pulls, f"{base}/{i}.json", seeded)
            outcomes.append(
                timed(Case(klass, f"pull-{name}", expect), _pull_judge(pull, service, events))
            )
        pull, service, events = _pull(pulls, f"{base}/endless", None)
        outcomes.append(
            timed(Case(SHAPE, "pull-endless-body", INVALID), _pull_judge(pull, service, events))
        )
        pull, service, events = _pull(pulls, f"{base}/missing.json", None)
        outcomes.append(
            timed(
                Case(SHAPE, "pull-404", (UpdateCode.DOWNLOAD_FAILED,)),
                _pull_judge(pull, service, events),
            )
        )
        outcomes += _twin_cases(pulls, base)
    return outcomes


__all__ = ["CLASS", "CLASSES", "run_corpus"]
