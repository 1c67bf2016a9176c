"""Hostile downloads (issue 8, Fetch): generated here, judged by the real fetchers.

Three classes:

* ``update.fetch.http``: a raw TCP server started here answers each path with bytes
  written as they are (bad status lines, huge or endless headers, bad and
  overflowing lengths, bad Content-Range, redirect loops and bad targets, slow
  drips that stall, compressed bodies, endless 1xx, endless bodies, wrong bytes).
  The real `HttpFetcher` fetches each; every case must end in an `UpdateError` with
  its code and a message, with never more than the signed size on disk and no
  finished file.
* ``update.fetch.chunk``: hostile MQTT chunks (truncated headers, wrong sizes and
  layouts, hash mismatches, index overflow, another bundle's chunks, a different
  payload for a chunk already written), each fed to a fresh `MqttFetcher` run: it
  must be dropped under its reason, with nothing written. Then all of them go
  through a real mosquitto before the good chunks, and the transfer must still
  complete with the right sha256.
* ``update.fetch.need``: hostile need messages (what a console parses from devices).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from agent.protocol.transfer import HEADER_BYTES, TransferError, chunks_of, decode_need
from agent.protocol.update import DeployRequest
from agent.update.errors import UpdateCode, UpdateError
from agent.update.fetch import HttpFetcher, HttpSettings, MqttFetcher, MqttSettings
from agent.update.fetch.mqtt import _Run
from agent.update.fetch.partial import PartialFile, complete_path
from tests.hostile import Case, Outcome, timed

HTTP, CHUNK, NEED = "update.fetch.http", "update.fetch.chunk", "update.fetch.need"
CLASS = HTTP
CLASSES = (HTTP, CHUNK, NEED)
SIZE = 1000
BODY = bytes(range(256)) * 4  # 1024 bytes; the signed file is the first SIZE
GOOD = BODY[:SIZE]
SHA = hashlib.sha256(GOOD).hexdigest()
F, OV, H = UpdateCode.DOWNLOAD_FAILED, UpdateCode.OVERSIZE, UpdateCode.HASH_MISMATCH

Script = Callable[[socket.socket], None]


def _send(data: bytes) -> Script:
    def script(conn: socket.socket) -> None:
        conn.sendall(data)

    return script


def _head(status: str = "200 OK", *headers: str) -> bytes:
    return ("HTTP/1.1 " + status + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode(
        "latin-1"
    )


def _ok(body: bytes = GOOD, *headers: str) -> Script:
    return _send(_head("200 OK", f"Content-Length: {len(body)}", *headers) + body)


def _endless(head: bytes, piece: bytes, chunked: bool = False) -> Script:
    def script(conn: socket.socket) -> None:
        conn.sendall(head)
        for _ in range(20_000):
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)

    return script


def _drip_then_stall(n: int) -> Script:
    def script(conn: socket.socket) -> None:
        conn.sendall(_head("200 OK", f"Content-Length: {SIZE}"))
        for b in GOOD[:n]:
            conn.sendall(bytes([b]))
            time.sleep(0.05)
        time.sleep(1.5)

    return script


def _http_cases(port: int) -> list[tuple[Case, Script]]:
    here = f"http://127.0.0.1:{port}"
    items: list[tuple[str, str | tuple[str, ...], Script]] = [
        ("status-not-a-number", F, _send(b"HTTP/1.1 abc OK\r\n\r\n")),
        ("status-line-garbage", F, _send(b"\x00\xff\x16\x03\x01 hello\r\n\r\n")),
        ("status-line-not-http", F, _send(b"FOO 200 OK\r\nContent-Length: 0\r\n\r\n")),
        ("http09-bare-body", F, _send(GOOD)),
        ("empty-answer", F, _send(b"")),
        ("status-then-close", F, _send(b"HTTP/1.1 200 OK\r\n")),
        ("status-999", F, _send(_head("999 Weird", "Content-Length: 0"))),
        ("status-304", F, _send(_head("304 Not Modified"))),
        ("status-404", F, _send(_head("404 Not Found", "Content-Length: 0"))),
        ("status-403", F, _send(_head("403 Forbidden", "Content-Length: 0"))),
        ("status-500-always", F, _send(_head("500 Oops", "Content-Length: 0"))),
        ("status-429-always", F, _send(_head("429 Slow Down", "Retry-After: 99999", "Content-Length: 0"))),
        ("header-line-70k", F, _send(_head("200 OK", "X-Big: " + "a" * 70_000, f"Content-Length: {SIZE}") + GOOD)),
        ("headers-200-lines", F, _send(_head("200 OK", *[f"X-{i}: v" for i in range(200)]) + GOOD)),
        ("headers-endless", F, _endless(b"HTTP/1.1 200 OK\r\n", b"X-More: yes\r\n")),
        ("interim-100-endless", F, _endless(b"", b"HTTP/1.1 100 Continue\r\n\r\n")),
        ("content-length-negative", F, _send(_head("200 OK", "Content-Length: -1") + GOOD)),
        ("content-length-not-a-number", F, _send(_head("200 OK", "Content-Length: 1e3") + GOOD)),
        ("content-length-overflowing", F, _send(_head("200 OK", "Content-Length: " + "9" * 40) + GOOD)),
        ("content-length-twice-different", F, _send(_head("200 OK", "Content-Length: 1000", "Content-Length: 10") + GOOD)),
        ("content-length-above-size", OV, _ok(BODY)),
        ("content-length-huge", OV, _send(_head("200 OK", "Content-Length: 18446744073709551615") + GOOD)),
        ("body-past-size-no-length", OV, _send(_head("200 OK", "Connection: close") + BODY)),
        ("body-endless-close-delimited", OV, _endless(_head("200 OK", "Connection: close"), b"x" * 4096)),
        ("body-endless-chunked", OV, _endless(_head("200 OK", "Transfer-Encoding: chunked"), b"y" * 4096, chunked=True)),
        ("chunked-size-overflow", (OV, F), _endless(_head("200 OK", "Transfer-Encoding: chunked") + b"ffffffffffffffffffffffff\r\n", b"z" * 4096)),
        ("chunked-size-garbage", F, _send(_head("200 OK", "Transfer-Encoding: chunked") + b"zz\r\nabc\r\n0\r\n\r\n")),
        ("body-short-then-close", F, _send(_head("200 OK", f"Content-Length: {SIZE}") + GOOD[:300])),
        ("content-range-garbage", F, _send(_head("206 Partial", "Content-Range: bytes abc", f"Content-Length: {SIZE}") + GOOD)),
        ("content-range-total-above-size", OV, _send(_head("206 Partial", "Content-Range: bytes 0-999/5000", f"Content-Length: {SIZE}") + GOOD)),
        ("content-range-past-size", OV, _send(_head("206 Partial", "Content-Range: bytes 0-4999/*", "Content-Length: 5000") + BODY)),
        ("content-range-total-below-size", F, _send(_head("206 Partial", "Content-Range: bytes 0-499/500", "Content-Length: 500") + GOOD[:500])),
        ("content-range-wrong-start", F, _send(_head("206 Partial", "Content-Range: bytes 500-999/1000", "Content-Length: 500") + GOOD[500:])),
        ("content-range-backwards", OV, _send(_head("206 Partial", "Content-Range: bytes 900-100/1000", "Content-Length: 0"))),
        ("content-range-overflowing", F, _send(_head("206 Partial", "Content-Range: bytes 0-" + "9" * 30 + "/1000", "Content-Length: 0"))),
        ("redirect-loop", F, _send(_head("302 Found", "Location: /redirect-loop", "Content-Length: 0"))),
        ("redirect-no-location", F, _send(_head("302 Found", "Content-Length: 0"))),
        ("redirect-ftp", F, _send(_head("301 Moved", "Location: ftp://127.0.0.1/x", "Content-Length: 0"))),
        ("redirect-file", F, _send(_head("301 Moved", "Location: file:///etc/shadow", "Content-Length: 0"))),
        ("redirect-javascript", F, _send(_head("307 Moved", "Location: javascript:alert(1)", "Content-Length: 0"))),
        ("redirect-credentials", F, _send(_head("307 Moved", "Location: http://admin:pw@127.0.0.1/x", "Content-Length: 0"))),
        ("redirect-control-chars", F, _send(_head("307 Moved", "Location: /a\x01b", "Content-Length: 0"))),
        ("redirect-bad-port", F, _send(_head("307 Moved", "Location: http://127.0.0.1:99999/x", "Content-Length: 0"))),
        ("redirect-huge", F, _send(_head("307 Moved", "Location: /" + "a" * 5000, "Content-Length: 0"))),
        ("redirect-unreachable-port", F, _send(_head("302 Found", "Location: http://127.0.0.1:9/x", "Content-Length: 0"))),
        ("redirect-https-to-plain-port", F, _send(_head("302 Found", f"Location: https://127.0.0.1:{port}/status-404", "Content-Length: 0"))),
        ("slow-drip-then-stall", F, _drip_then_stall(5)),
        ("stall-before-headers", F, lambda conn: time.sleep(1.5)),
        ("gzip-encoded", F, _ok(GOOD, "Content-Encoding: gzip")),
        ("brotli-encoded", F, _ok(GOOD, "Content-Encoding: br")),
        ("identity-then-gzip", F, _ok(GOOD, "Content-Encoding: identity, gzip")),
        ("wrong-bytes", H, _ok(bytes(SIZE))),
    ]  # fmt: skip
    del here
    return [(Case(HTTP, n, (e,) if isinstance(e, str) else e), s) for n, e, s in items]


class RawServer:
    """Answers each request with the script of its path, then closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port: int = self.sock.getsockname()[1]
        self.scripts: dict[str, Script] = {}
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                piece = conn.recv(4096)
                if not piece:
                    return
                data += piece
            path = data.split(b" ", 2)[1].decode("latin-1") if data.count(b" ") >= 2 else "/"
            script = self.scripts.get(path)
            if script is not None:
                script(conn)

    def close(self) -> None:
        self.sock.close()


def _judge_http(case: Case, url: str, workdir: Path) -> Outcome:
    part = workdir / f"{case.name}.part"
    fetcher = HttpFetcher(
        HttpSettings(connect_timeout_s=2, read_timeout_s=0.5, max_retries=1, max_redirects=3,
                     backoff_min_s=0.01, backoff_max_s=0.02)
    )  # fmt: skip
    req = DeployRequest.from_args({"url": url, "sha256": SHA, "size": SIZE, "version": "2.0.0"})

    def judge() -> tuple[str | None, str]:
        try:
            fetcher.fetch(req, part, lambda d, t: None, threading.Event())
        except UpdateError as exc:
            code, message = exc.code, exc.message
        except Exception:
            return f"crash:{traceback.format_exc(limit=3)}", traceback.format_exc()
        else:
            return None, "accepted"
        on_disk = part.stat().st_size if part.exists() else 0
        if on_disk > SIZE:
            return "wrote-past-size", f"{on_disk} bytes on disk for a {SIZE}-byte bundle"
        if complete_path(part).exists():
            return "finished-file-left", str(complete_path(part))
        return code, message

    return timed(case, judge)


def run_http(workdir: Path) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    server = RawServer()
    try:
        cases = _http_cases(server.port)
        for case, script in cases:
            server.scripts[f"/{case.name}"] = script
        outcomes = [
            _judge_http(c, f"http://127.0.0.1:{server.port}/{c.name}", workdir) for c, _ in cases
        ]
        # A https URL at a plain HTTP port: the TLS handshake fails, never a traceback.
        tls = Case(HTTP, "https-at-a-plain-port", (F,))
        server.scripts["/x"] = _ok()
        outcomes.append(_judge_http(tls, f"https://127.0.0.1:{server.port}/x", workdir))
        return outcomes
    finally:
        server.close()


# ----------------------------------------------------------------------------- chunks

DATA = bytes((i * 7 + 3) % 256 for i in range(10_000))
DATA_SHA = hashlib.sha256(DATA).hexdigest()
CHUNKS = chunks_of(DATA, 4096)  # 3 chunks: 4096, 4096, 1808
OTHER = chunks_of(bytes(10_000), 4096)
_HDR = struct.Struct(">4sBBIIIQ32s32sI")


def _forge(index: int = 1, total: int = 3, chunk_size: int = 4096, size: int = 10_000,
           bsha: bytes | None = None, payload: bytes | None = None, plen: int | None = None,
           csha: bytes | None = None, magic: bytes = b"ERC1", version: int = 1,
           flags: int = 0) -> bytes:  # fmt: skip
    if payload is None:
        payload = CHUNKS[index].payload if index < 3 else b"p" * 4096
    return (
        _HDR.pack(
            magic, version, flags, index, total, chunk_size, size, bsha or bytes.fromhex(DATA_SHA),
            csha or hashlib.sha256(payload).digest(), len(payload) if plen is None else plen,
        )
        + payload
    )  # fmt: skip


def chunk_cases() -> list[tuple[Case, bytes, bool]]:
    """(case, bytes, after_a_good_chunk_0)."""
    good = CHUNKS[1].encode()
    items: list[tuple[str, str, bytes, bool]] = [
        ("empty", "truncated", b"", False),
        ("one-byte", "truncated", b"E", False),
        ("header-cut-at-50", "truncated", good[:50], False),
        ("header-cut-at-93", "truncated", good[: HEADER_BYTES - 1], False),
        ("bad-magic", "magic", b"ERCX" + good[4:], False),
        ("json-instead", "magic", b'{"index": 1, "payload": "AAAA"}' + b" " * 80, False),
        ("version-2", "version", _forge(version=2), False),
        ("flags-set", "version", _forge(flags=1), False),
        ("chunk-size-0", "layout", _forge(chunk_size=0), False),
        ("chunk-size-100", "layout", _forge(chunk_size=100), False),
        ("chunk-size-1mib", "layout", _forge(chunk_size=1 << 20, total=1), False),
        ("total-0", "layout", _forge(total=0), False),
        ("total-wrong-for-size", "layout", _forge(total=4), False),
        ("total-max-u32", "layout", _forge(total=2**32 - 1), False),
        ("size-0", "layout", _forge(size=0, total=1), False),
        ("index-equals-total", "index", _forge(index=3), False),
        ("index-max-u32", "index", _forge(index=2**32 - 1), False),
        ("payload-len-says-more", "length", _forge(plen=4097), False),
        ("payload-len-says-less", "length", _forge(plen=4095), False),
        ("payload-len-max-u32", "length", _forge(plen=2**32 - 1), False),
        ("trailing-byte", "length", good + b"\0", False),
        ("short-middle-chunk", "length", _forge(payload=b"s" * 100), False),
        ("long-last-chunk", "length", _forge(index=2, payload=b"l" * 4096), False),
        ("payload-flipped", "hash", good[:-1] + bytes([good[-1] ^ 0x80]), False),
        ("chunk-sha-zero", "hash", _forge(csha=bytes(32)), False),
        ("another-bundle", "other_bundle", OTHER[1].encode(), False),
        ("another-size-same-layout", "other_bundle", _forge(size=9000, payload=CHUNKS[1].payload), False),
        ("other-chunk-size-after-first", "layout",
         chunks_of(DATA, 2048)[1].encode(), True),
        ("rewrite-of-a-written-chunk", "duplicate", _forge(index=0, payload=b"r" * 4096), True),
    ]  # fmt: skip
    return [(Case(CHUNK, n, (f"chunk.{r}",)), b, pre) for n, r, b, pre in items]


class _Unused:
    """No link: these cases are judged by the fetch loop's own chunk path."""

    def subscribe_chunks(self, *a: object, **k: object) -> None: ...
    def unsubscribe_chunks(self, *a: object) -> None: ...
    def request_chunks(self, *a: object) -> None: ...


def _judge_chunk(case: Case, data: bytes, prelude: bool, workdir: Path) -> Outcome:
    req = DeployRequest.from_args(
        {"transfer": "t1", "sha256": DATA_SHA, "size": len(DATA), "version": "2.0.0"}
    )

    def judge() -> tuple[str | None, str]:
        part = PartialFile(workdir / f"{case.name}.part", len(DATA), DATA_SHA)
        fetcher = MqttFetcher(_Unused(), MqttSettings())
        run = _Run(fetcher, req, "t1", part, None, lambda d, t: None)
        try:
            if prelude:
                assert run.take(CHUNKS[0].encode())
            before = bytes(run.bitmap.bits) if run.bitmap else b""
            new = run.take(data)
            part.close()
        except Exception:
            return "crash", traceback.format_exc()
        if new:
            return None, "the chunk was written"
        written = part.path.read_bytes() if part.path.exists() else b""
        expected = CHUNKS[0].payload if prelude else b""
        if written != expected or (bytes(run.bitmap.bits) if run.bitmap else b"") != before:
            return "written", "a dropped chunk changed the partial file or the bitmap"
        if fetcher.duplicates:
            return "chunk.duplicate", "a chunk already on disk: kept what was written first"
        reasons = [r for r, n in fetcher.dropped.items() if n]
        if len(reasons) != 1:
            return None, f"dropped counts {dict(fetcher.dropped)}"
        return f"chunk.{reasons[0]}", f"dropped ({reasons[0]}), counted, not written"

    return timed(case, judge)


def _broker_run(workdir: Path, hostile: list[bytes]) -> Outcome:
    """Every hostile chunk through a real mosquitto first, then the good ones."""
    from fleet.transfer import ChunkSender
    from tests.agent.update.fetch.mqttside import DEVICE, Console, Device
    from tests.mqtt_broker import Broker

    case = Case(CHUNK, "broker-hostile-chunks-then-good-ones", ("transfer.completed",))

    def judge() -> tuple[str | None, str]:
        req = DeployRequest.from_args(
            {"transfer": "t1", "sha256": DATA_SHA, "size": len(DATA), "version": "2.0.0"}
        )
        with Broker(workdir) as broker, Device(broker) as device:
            console = Console(broker)
            topic = str(device.topics.bundle("t1"))
            sent = threading.Event()

            def first_hostile(index: int, before: int) -> bool:
                if not sent.is_set():
                    for raw in hostile:
                        console.client.publish(topic, raw, qos=1)  # on the loop thread: no waiting
                    sent.set()
                return False

            console.add(ChunkSender(console.client, DEVICE, "t1", DATA, 4096, skip=first_hostile))
            fetcher = MqttFetcher(device.transfers, MqttSettings(0.3, 60))
            try:
                got = fetcher.fetch(
                    req, workdir / "broker.part", lambda d, t: None, threading.Event()
                )
            finally:
                console.close()
        if got.read_bytes() != DATA:
            return "wrong-file", "the transfer completed with other bytes"
        dropped = sum(fetcher.dropped.values()) + fetcher.duplicates
        if dropped < len(hostile) - 2:  # two of them need a first chunk in place to be judged
            return "missed", f"only {dropped} of {len(hostile)} hostile chunks dropped"
        return (
            "transfer.completed",
            f"completed with the right sha256; dropped {dict(fetcher.dropped)}",
        )

    return timed(case, judge)


def run_chunks(workdir: Path) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    cases = chunk_cases()
    outcomes = [_judge_chunk(c, b, pre, workdir) for c, b, pre in cases]
    outcomes.append(_broker_run(workdir / "broker", [b for c, b, pre in cases if not pre]))
    return outcomes


# ----------------------------------------------------------------------------- need


def need_cases() -> list[tuple[Case, bytes]]:
    ok = {"v": 1, "transfer": "t1", "sha256": DATA_SHA, "size": 10_000, "total": 3,
          "missing": [[0, 3]], "reason": "silence"}  # fmt: skip
    import json

    def j(**kw: object) -> bytes:
        return json.dumps({**ok, **kw}).encode()

    items = [
        ("not-json", b"need please"), ("json-list", b"[1]"), ("invalid-utf8", b'{"v": 1, "\xff": 1}'),
        ("nan", j().replace(b'"size": 10000', b'"size": NaN')), ("version-2", j(v=2)),
        ("unknown-key", j(admin=True)), ("transfer-slash", j(transfer="a/b")),
        ("transfer-long", j(transfer="t" * 65)), ("sha-upper", j(sha256=DATA_SHA.upper())),
        ("size-bool", j(size=True)), ("size-negative", j(size=-1)), ("size-float", j(size=1.5)),
        ("total-zero", j(total=0)), ("total-huge", j(total=2**40)),
        ("range-past-total", j(missing=[[0, 4]])), ("range-backwards", j(missing=[[2, 1]])),
        ("range-negative", j(missing=[[-1, 2]])), ("range-three-numbers", j(missing=[[0, 1, 2]])),
        ("range-strings", j(missing=[["0", "1"]])), ("ranges-too-many", j(total=10**6, missing=[[i, i + 1] for i in range(0, 600, 2)])),
        ("ranges-without-total", j(total=None, missing=[[0, 1]])), ("reason-unknown", j(reason="please")),
        ("deep-nesting", b'{"v": 1, "missing": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("huge", j(pad="x" * 20_000)),
    ]  # fmt: skip
    return [(Case(NEED, n, ("need.malformed", "need.too_large")), b) for n, b in items]


def run_needs() -> list[Outcome]:
    def one(case: Case, data: bytes) -> Outcome:
        def judge() -> tuple[str | None, str]:
            try:
                decode_need(data)
            except TransferError as exc:
                return f"need.{exc.reason}", exc.message
            except Exception:
                return "crash", traceback.format_exc()
            return None, "accepted"

        return timed(case, judge)

    return [one(c, b) for c, b in need_cases()]


def run_corpus(workdir: Path) -> list[Outcome]:
    workdir = Path(workdir)
    return run_http(workdir / "http") + run_chunks(workdir / "chunks") + run_needs()


__all__ = ["CLASS", "CLASSES", "run_corpus"]
