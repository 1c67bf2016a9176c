"""Hostile requests against a real agent's local API (issue 7, sections 3, 4 and 9).

Every case is raw bytes written to the agent's Unix socket or its TCP listener
(which requires a bearer token); the answer is parsed as a client would: status
line, headers, JSON error body. A case passes when the agent refuses it with the
expected code and a message, never a 500 or a traceback. Cases are generated
here at run time; nothing binary is committed.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import AgentProcess, base_config, write_config
from tests.hostile import Case, Outcome

CLASSES = (
    "request.line",
    "request.headers",
    "request.framing",
    "request.method",
    "request.media",
    "request.json",
    "request.kserve",
    "request.auth",
    "request.resources",
    "request.shm",
)
CLASS = "request"
TOKEN = "hostile-corpus-token-0123456789abcdef"
INFER = b"/v2/models/digits/infer"
SOFT_LIMIT_MB = 300
BODY_INFLIGHT_MB = 250
MAX_REQUEST_MB = 280
# Short deadlines keep the slow-client cases quick; they are not timing assertions.
HEAD_TIMEOUT_S = 1.5


@dataclass(frozen=True)
class RequestCase:
    case: Case
    # raw bytes, or a function of the agent (for sizes that depend on its RSS)
    payload: bytes | Callable[[AgentProcess], bytes]
    tcp: bool = False
    # send the payload in pieces with pauses (slow clients)
    pieces: int = 1
    pause_s: float = 0.0


def _req(
    method: bytes = b"POST",
    target: bytes = INFER,
    body: bytes = b"",
    headers: list[bytes] | None = None,
    version: bytes = b"HTTP/1.1",
    length: bool = True,
) -> bytes:
    lines = [method + b" " + target + b" " + version, b"host: edgerun"]
    if length:
        lines.append(b"content-length: " + str(len(body)).encode())
    lines += headers or []
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _tensor(**changes: object) -> dict[str, object]:
    t: dict[str, object] = {
        "name": "input",
        "datatype": "FP32",
        "shape": [1, 1, 8, 8],
        "data": [0.0] * 64,
    }
    t.update(changes)
    return t


def _infer(**changes: object) -> bytes:
    body: dict[str, object] = {"inputs": [_tensor()]}
    body.update(changes)
    return _req(body=_json(body))


def _binary(head_len: bytes, blob: bytes, size: object = 256) -> bytes:
    head = _json({"inputs": [_tensor(data=None, parameters={"binary_data_size": size})]})
    return _req(
        body=head + blob,
        headers=[
            b"inference-header-content-length: " + head_len.replace(b"N", str(len(head)).encode())
        ],
    )


def _headroom_body(agent: AgentProcess) -> bytes:
    """A head announcing a body just over what the agent's memory headroom allows."""
    rss = psutil.Process(agent.proc.pid).memory_info().rss
    size = SOFT_LIMIT_MB * 1024 * 1024 - rss + 8 * 1024 * 1024
    return (
        b"POST " + INFER + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(size).encode() + b"\r\n\r\n"
    )


def cases() -> list[RequestCase]:
    out: list[RequestCase] = []

    def add(
        klass: str, name: str, expect: str | tuple[str, ...], payload: object, **kw: object
    ) -> None:
        codes = (expect,) if isinstance(expect, str) else expect
        out.append(RequestCase(Case(f"request.{klass}", name, codes), payload, **kw))  # type: ignore[arg-type]

    bad = "request.malformed"
    # --- request line
    add("line", "http-9.9", "request.version", _req(b"GET", b"/v2", version=b"HTTP/9.9"))
    add("line", "http-2.0", "request.version", _req(b"GET", b"/v2", version=b"HTTP/2.0"))
    add("line", "http-no-minor", bad, _req(b"GET", b"/v2", version=b"HTTP/1"))
    add("line", "lowercase-version", bad, _req(b"GET", b"/v2", version=b"http/1.1"))
    add("line", "garbage-line", bad, b"HELLO\r\n\r\n")
    add("line", "two-spaces", bad, b"GET  /v2 HTTP/1.1\r\nhost: x\r\n\r\n")
    add("line", "absolute-uri", bad, _req(b"GET", b"http://evil/v2"))
    add("line", "asterisk-target", bad, _req(b"OPTIONS", b"*"))
    add("line", "target-with-nul", bad, b"GET /v2\x00x HTTP/1.1\r\nhost: x\r\n\r\n")
    add("line", "target-utf8", bad, _req(b"GET", "/v2/models/dïgits".encode()))
    add("line", "method-with-slash", bad, _req(b"GE/T", b"/v2"))
    add(
        "line",
        "tls-client-hello",
        bad,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40 + b"\r\n\r\n",
    )
    add("line", "empty-head", bad, b"\r\n\r\n")
    add("line", "long-target", "request.headers", _req(b"GET", b"/" + b"a" * 20000))
    # --- header fields
    add("headers", "no-colon", bad, _req(b"GET", b"/v2", headers=[b"no colon here"]))
    add("headers", "space-before-colon", bad, _req(b"GET", b"/v2", headers=[b"x-a : 1"]))
    add("headers", "obs-fold", bad, _req(b"GET", b"/v2", headers=[b"x-a: 1", b" folded"]))
    add("headers", "nul-in-value", bad, _req(b"GET", b"/v2", headers=[b"x-a: a\x00b"]))
    add("headers", "del-in-name", bad, _req(b"GET", b"/v2", headers=[b"x\x7fa: 1"]))
    add("headers", "bare-lf", bad, b"GET /v2 HTTP/1.1\nhost: x\n\n")
    add("headers", "no-host", bad, b"GET /v2 HTTP/1.1\r\n\r\n")
    add("headers", "two-hosts", bad, _req(b"GET", b"/v2", headers=[b"host: other"]))
    add(
        "headers",
        "too-many",
        "request.headers",
        _req(b"GET", b"/v2", headers=[b"x-%d: 1" % i for i in range(150)]),
    )
    add(
        "headers",
        "huge-value",
        "request.headers",
        _req(b"GET", b"/v2", headers=[b"x: " + b"a" * 70000]),
    )
    # --- body framing
    body = _json({"inputs": [_tensor()]})
    n = str(len(body)).encode()
    for name, value in [
        ("plus-sign", b"+" + n),
        ("underscore", n[:1] + b"_" + n[1:]),
        ("negative", b"-4"),
        ("hex", b"0x" + n),
        ("list", n + b", " + n),
        ("float", n + b".0"),
        ("empty", b""),
    ]:
        add(
            "framing",
            f"content-length-{name}",
            bad,
            _req(body=body, length=False, headers=[b"content-length: " + value]),
        )
    add("framing", "two-lengths", bad, _req(body=body, headers=[b"content-length: 5"]))
    add(
        "framing",
        "chunked",
        "request.length",
        _req(
            body=b"5\r\nhello\r\n0\r\n\r\n", length=False, headers=[b"transfer-encoding: chunked"]
        ),
    )
    add(
        "framing",
        "te-and-cl",
        "request.length",
        _req(body=body, headers=[b"transfer-encoding: chunked"]),
    )
    add(
        "framing",
        "te-gzip",
        "request.transfer_encoding",
        _req(body=body, length=False, headers=[b"transfer-encoding: gzip"]),
    )
    add(
        "framing",
        "length-over-limit",
        "request.too_large",
        _req(length=False, headers=[b"content-length: 300000000"]),
    )
    add(
        "framing",
        "length-40-digits",
        "request.too_large",
        _req(length=False, headers=[b"content-length: " + b"9" * 40]),
    )
    add(
        "framing",
        "expect-unknown",
        "request.expectation",
        _req(body=body, headers=[b"expect: 200-ok"]),
    )
    add(
        "framing",
        "expect-continue-too-large",
        "request.too_large",
        _req(length=False, headers=[b"expect: 100-continue", b"content-length: 300000000"]),
    )
    # --- methods and paths
    add("method", "delete-v2", "request.method", _req(b"DELETE", b"/v2"))
    add("method", "post-metrics", "request.method", _req(b"POST", b"/metrics", b"{}"))
    add("method", "put-live", "request.method", _req(b"PUT", b"/v2/health/live"))
    add("method", "get-infer", "request.method", _req(b"GET", INFER))
    add("method", "post-model", "request.method", _req(b"POST", b"/v2/models/digits", body))
    add("method", "patch-stats", "request.method", _req(b"PATCH", b"/v2/models/stats"))
    add("method", "unknown-path-with-body", "endpoint.not_found", _req(b"POST", b"/v3/x", body))
    add(
        "method",
        "unknown-model",
        "model.not_found",
        _req(body=body, target=b"/v2/models/cats/infer"),
    )
    add("method", "dotdot-path", "endpoint.not_found", _req(b"GET", b"/v2/models/../../etc/passwd"))
    # --- media
    add(
        "media",
        "gzip-body",
        "request.media_type",
        _req(body=b"\x1f\x8b\x08\x00" + b"\0" * 20, headers=[b"content-encoding: gzip"]),
    )
    add(
        "media",
        "text-plain",
        "request.media_type",
        _req(body=body, headers=[b"content-type: text/plain"]),
    )
    add(
        "media",
        "form",
        "request.media_type",
        _req(body=body, headers=[b"content-type: application/x-www-form-urlencoded"]),
    )
    # --- JSON
    add("json", "not-json", bad, _req(body=b"{not json"))
    add("json", "nested-100k", bad, _req(body=b"[" * 100_000))
    add("json", "nested-objects-100k", bad, _req(body=b'{"a":' * 100_000))
    add("json", "nested-65", bad, _req(body=b'{"inputs": ' + b"[" * 65 + b"]" * 65 + b"}"))

    def ints(digits: int, datatype: str = "INT64") -> bytes:
        return _req(
            body=b'{"inputs": [{"name": "input", "datatype": "%s", "shape": [1], "data": [%s]}]}'
            % (datatype.encode(), b"7" * digits)
        )

    add("json", "int-5000-digits", bad, ints(5000))
    add("json", "int-400-digits-int64", bad, ints(400))
    add("json", "int-400-digits-fp32", bad, ints(400, "FP32"))
    add(
        "json",
        "nan-literal",
        bad,
        _req(
            body=b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [NaN]}]}'
        ),
    )
    add(
        "json",
        "infinity-literal",
        bad,
        _req(
            body=b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [-Infinity]}]}'
        ),
    )
    add(
        "json",
        "float-overflow",
        bad,
        _req(body=_json({"inputs": [_tensor()]}).replace(b"[0.0, ", b"[1e999, ", 1)),
    )
    add("json", "invalid-utf8", bad, _req(body=b'{"inputs": "\xff\xfe"}'))
    add("json", "top-level-array", bad, _req(body=b"[1, 2]"))
    add("json", "top-level-string", bad, _req(body=b'"inputs"'))
    add("json", "empty-body", bad, _req(body=b""))
    # --- KServe request shapes
    add("kserve", "inputs-object", bad, _infer(inputs={"input": 1}))
    add("kserve", "inputs-empty", bad, _infer(inputs=[]))
    add("kserve", "outputs-empty-object", bad, _infer(outputs=[{}]))
    add("kserve", "outputs-number", bad, _infer(outputs=5))
    add("kserve", "outputs-name-number", bad, _infer(outputs=[{"name": 5}]))
    add("kserve", "outputs-unknown", bad, _infer(outputs=[{"name": "probabilities"}]))
    add("kserve", "outputs-twice", bad, _infer(outputs=[{"name": "logits"}, {"name": "logits"}]))
    add(
        "kserve", "output-params-list", bad, _infer(outputs=[{"name": "logits", "parameters": [1]}])
    )
    add(
        "kserve",
        "binary-data-string",
        bad,
        _infer(outputs=[{"name": "logits", "parameters": {"binary_data": "yes"}}]),
    )
    add("kserve", "parameters-list", bad, _infer(parameters=[1]))
    add("kserve", "binary-output-number", bad, _infer(parameters={"binary_data_output": 1}))
    add("kserve", "id-number", bad, _infer(id=5))
    add("kserve", "dims-100", bad, _infer(inputs=[_tensor(shape=[1] * 100, data=[0.0])]))
    add("kserve", "dims-huge", bad, _infer(inputs=[_tensor(shape=[2**62, 2**62, 2**62])]))
    add("kserve", "dim-over-int64", bad, _infer(inputs=[_tensor(shape=[2**70])]))
    add("kserve", "dim-negative", bad, _infer(inputs=[_tensor(shape=[-1, 1, 8, 8])]))
    add("kserve", "dim-float", bad, _infer(inputs=[_tensor(shape=[1.0, 1, 8, 8])]))
    add("kserve", "dim-bool", bad, _infer(inputs=[_tensor(shape=[True, 1, 8, 8])]))
    add("kserve", "shape-string", bad, _infer(inputs=[_tensor(shape="1,1,8,8")]))
    add("kserve", "datatype-unknown", bad, _infer(inputs=[_tensor(datatype="FP128")]))
    add("kserve", "datatype-list", bad, _infer(inputs=[_tensor(datatype=["FP32"])]))
    add("kserve", "data-missing", bad, _infer(inputs=[_tensor(data=None)]))
    add("kserve", "data-object", bad, _infer(inputs=[_tensor(data={"a": 1})]))
    add("kserve", "data-string", bad, _infer(inputs=[_tensor(data="abc")]))
    add("kserve", "data-ragged", bad, _infer(inputs=[_tensor(data=[[0.0] * 32, [0.0] * 31])]))
    add("kserve", "data-short", bad, _infer(inputs=[_tensor(data=[0.0] * 10)]))
    add("kserve", "data-words", bad, _infer(inputs=[_tensor(data=["a"] * 64)]))
    add("kserve", "name-missing", bad, _infer(inputs=[_tensor(name=None)]))
    add("kserve", "name-twice", bad, _infer(inputs=[_tensor(), _tensor()]))
    add("kserve", "tensor-params-list", bad, _infer(inputs=[_tensor(parameters=[1])]))
    add("kserve", "tensor-not-object", bad, _infer(inputs=[5]))
    add("kserve", "unknown-input", "input.mismatch", _infer(inputs=[_tensor(name="pixels")]))
    add("kserve", "wrong-shape", "input.mismatch", _infer(inputs=[_tensor(shape=[1, 64])]))
    add("kserve", "wrong-dtype", "input.mismatch", _infer(inputs=[_tensor(datatype="FP64")]))
    add(
        "kserve",
        "batch-too-large",
        "request.too_large",
        _infer(inputs=[_tensor(shape=[300, 1, 8, 8], data=[0] * (300 * 64))]),
    )
    add("kserve", "binary-size-negative", bad, _binary(b"N", b"\0" * 256, -1))
    add("kserve", "binary-size-bool", bad, _binary(b"N", b"\0" * 256, True))
    add("kserve", "binary-size-short", bad, _binary(b"N", b"\0" * 100))
    add("kserve", "binary-trailing", bad, _binary(b"N", b"\0" * 300))
    add("kserve", "header-length-word", bad, _binary(b"many", b"\0" * 256))
    add("kserve", "header-length-negative", bad, _binary(b"-1", b"\0" * 256))
    add("kserve", "header-length-beyond", bad, _binary(b"99999", b"\0" * 256))
    # --- auth on the TCP listener
    good_get = _req(b"GET", b"/v2/edgerun/status", length=False)
    add("auth", "no-token-status", "auth.required", good_get, tcp=True)
    add("auth", "no-token-infer", "auth.required", _infer(), tcp=True)
    add(
        "auth",
        "no-token-metrics",
        "auth.required",
        _req(b"GET", b"/metrics", length=False),
        tcp=True,
    )
    add(
        "auth",
        "wrong-token",
        "auth.invalid",
        _req(b"GET", b"/v2", headers=[b"authorization: Bearer " + b"x" * len(TOKEN)]),
        tcp=True,
    )
    add(
        "auth",
        "short-token",
        "auth.invalid",
        _req(b"GET", b"/v2", headers=[b"authorization: Bearer a"]),
        tcp=True,
    )
    add(
        "auth",
        "token-prefix",
        "auth.invalid",
        _req(b"GET", b"/v2", headers=[b"authorization: Bearer " + TOKEN[:-1].encode()]),
        tcp=True,
    )
    add(
        "auth",
        "basic-auth",
        "auth.invalid",
        _req(b"GET", b"/v2", headers=[b"authorization: Basic dXNlcjpwYXNz"]),
        tcp=True,
    )
    add(
        "auth",
        "two-authorizations",
        bad,
        _req(
            b"GET",
            b"/v2",
            headers=[b"authorization: Bearer " + TOKEN.encode(), b"authorization: Bearer x"],
        ),
        tcp=True,
    )
    add(
        "auth",
        "no-token-big-body",
        "auth.required",
        _req(length=False, headers=[b"content-length: 100000000"]),
        tcp=True,
    )
    # --- resources: slow clients, memory admission
    add(
        "resources",
        "slow-head",
        "request.timeout",
        _req(b"GET", b"/v2", headers=[b"x-slow: 1"] * 40),
        pieces=8,
        pause_s=0.3,
    )
    add("resources", "one-byte-then-silence", "request.timeout", b"G")
    add("resources", "silent-client", "request.timeout", b"")
    add(
        "resources",
        "slow-body",
        "request.timeout",
        _req(body=b" " * 100, length=False, headers=[b"content-length: 2000"]),
    )
    add("resources", "body-over-headroom", "overloaded", _headroom_body)
    add(
        "resources",
        "body-over-inflight-budget",
        "overloaded",
        _req(
            length=False, headers=[b"content-length: " + str((BODY_INFLIGHT_MB + 1) << 20).encode()]
        ),
    )
    # --- Triton system shared memory (agent/api/shm.py)
    shm = b"/v2/systemsharedmemory/region/r1/register"
    add("shm", "key-path-traversal", "shm.invalid", _req(target=shm, body=_json(
        {"key": "../../etc/shadow", "byte_size": 8})))  # fmt: skip
    add("shm", "key-absolute-path", "shm.invalid", _req(target=shm, body=_json(
        {"key": "/proc/self/mem", "byte_size": 8})))  # fmt: skip
    add("shm", "key-dot-dot", "shm.invalid", _req(target=shm, body=_json(
        {"key": "/..", "byte_size": 8})))  # fmt: skip
    add("shm", "key-number", "shm.invalid", _req(target=shm, body=_json(
        {"key": 7, "byte_size": 8})))  # fmt: skip
    add("shm", "key-missing-object", "shm.not_found", _req(target=shm, body=_json(
        {"key": "/er-hostile-no-such-object", "byte_size": 8})))  # fmt: skip
    add("shm", "byte-size-string", "shm.invalid", _req(target=shm, body=_json(
        {"key": "/x", "byte_size": "8"})))  # fmt: skip
    add("shm", "offset-negative", "shm.invalid", _req(target=shm, body=_json(
        {"key": "/x", "byte_size": 8, "offset": -1})))  # fmt: skip
    add("shm", "byte-size-over-cap", "shm.limit", _req(target=shm, body=_json(
        {"key": "/x", "byte_size": 1 << 50})))  # fmt: skip
    add("shm", "register-not-json", bad, _req(target=shm, body=b"{key"))
    add("shm", "register-array", "shm.invalid", _req(target=shm, body=b"[]"))
    add("shm", "name-too-long", "shm.invalid", _req(
        target=b"/v2/systemsharedmemory/region/" + b"n" * 200 + b"/register",
        body=_json({"key": "/x", "byte_size": 8})))  # fmt: skip
    add("shm", "status-unknown", "shm.not_found",
        _req(b"GET", b"/v2/systemsharedmemory/region/nope/status"))  # fmt: skip
    add("shm", "register-get", "request.method",
        _req(b"GET", b"/v2/systemsharedmemory/region/r1/register"))  # fmt: skip
    add("shm", "unknown-action", "endpoint.not_found",
        _req(b"POST", b"/v2/systemsharedmemory/region/r1/map"))  # fmt: skip
    shm_in = {"shared_memory_region": "nope", "shared_memory_byte_size": 256}
    add("shm", "infer-unknown-region", "shm.not_found",
        _infer(inputs=[_tensor(data=None, parameters=shm_in)]))  # fmt: skip
    add("shm", "infer-region-and-data", bad, _infer(inputs=[_tensor(parameters=shm_in)]))
    add("shm", "infer-region-number", "shm.invalid", _infer(
        inputs=[_tensor(data=None, parameters={**shm_in, "shared_memory_region": 5})]))  # fmt: skip
    add("shm", "output-unknown-region", "shm.not_found", _infer(
        outputs=[{"name": "logits", "parameters": shm_in}]))  # fmt: skip
    return out


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    raw: bytes


def parse_answer(data: bytes) -> Answer:
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1.1") or not parts[1].isdigit():
        return Answer(None, {}, b"", data)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    return Answer(int(parts[1]), headers, body[:length], data)


def exchange(address: str, rc: RequestCase, agent: AgentProcess) -> bytes:
    family = socket.AF_UNIX if not rc.tcp else socket.AF_INET
    payload = rc.payload(agent) if callable(rc.payload) else rc.payload
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(20)  # a hang guard, far above any deadline of the agent
        if rc.tcp:
            host, _, port = address.removeprefix("tcp:").rpartition(":")
            s.connect((host, int(port)))
        else:
            s.connect(address)
        step = max(1, len(payload) // rc.pieces)
        try:
            for i in range(0, len(payload), step):
                s.sendall(payload[i : i + step])
                if rc.pause_s:
                    time.sleep(rc.pause_s)
        except OSError:
            pass  # refused mid-send: the answer is still there to read
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                answer = parse_answer(b"".join(chunks))
                if answer.status is not None and len(answer.body) >= int(
                    answer.headers.get("content-length", "0")
                ):
                    break
        except OSError:
            pass
    return b"".join(chunks)


def judge(answer: Answer) -> tuple[str | None, str]:
    if answer.status is None:
        return None, f"no HTTP answer: {answer.raw[:200]!r}"
    if answer.status < 400:
        return None, f"accepted with {answer.status}"
    try:
        body = json.loads(answer.body)
        code, message = str(body["code"]), str(body["error"])
    except (ValueError, KeyError, TypeError):
        return None, f"{answer.status} without a JSON error: {answer.body[:200]!r}"
    if answer.status >= 500 and code not in (
        "overloaded",
        "request.version",
        "request.transfer_encoding",
    ):
        return f"http-{answer.status}", message
    return code, message


def corpus_config(tmp: Path) -> str:
    api = "\n".join(
        [
            'tcp = "127.0.0.1:0"',
            'token = "%s"' % (tmp / "api-token"),
            f"max_request_mb = {MAX_REQUEST_MB}",
            f"max_body_inflight_mb = {BODY_INFLIGHT_MB}",
            "max_batch_size = 64",
            f"head_timeout_s = {HEAD_TIMEOUT_S}",
            f"body_timeout_s = {HEAD_TIMEOUT_S}",
        ]
    )
    return base_config(tmp, api=api) + f"[memory]\nsoft_limit_mb = {SOFT_LIMIT_MB}\n"


@contextmanager
def corpus_agent(workdir: Path) -> Iterator[AgentProcess]:
    if len(str(workdir / "api.sock")) > 100:  # sun_path holds 108 bytes
        workdir = Path(tempfile.mkdtemp(prefix="er-hreq-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "api-token").write_text(TOKEN + "\n")
    config = write_config(workdir / "agent.toml", corpus_config(workdir))
    agent = AgentProcess(config, workdir / "api.sock")
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()


def tcp_address(agent: AgentProcess) -> str:
    with agent.client() as c:
        return str(next(a for a in c.get_json("/v2/edgerun/status")["api"] if a.startswith("tcp:")))


def run_cases(agent: AgentProcess) -> list[Outcome]:
    tcp = tcp_address(agent)
    process = psutil.Process(agent.proc.pid)
    outcomes = []
    for rc in cases():
        start = time.perf_counter()
        raw = exchange(tcp if rc.tcp else str(agent.socket), rc, agent)
        seconds = time.perf_counter() - start
        code, message = judge(parse_answer(raw))
        rss = process.memory_info().rss / (1024 * 1024)
        outcomes.append(Outcome(rc.case, code, message, seconds, round(rss, 1)))
    return outcomes


def run_corpus(workdir: Path) -> list[Outcome]:
    with corpus_agent(workdir) as agent:
        return run_cases(agent)


# ------------------------------------------------------------------ siege: slow clients + fd limit


@dataclass
class SiegeResult:
    attempted: int = 0
    answered: int = 0  # any HTTP answer: 200, or 503 while the agent is full
    served: int = 0  # 200
    latencies_ms: list[float] = field(default_factory=list)
    slow_cut: int = 0  # slow connections the agent answered (408/503) or closed
    peak_threads: int = 0
    first_served_s: float | None = None
    errors: Counter[str] = field(default_factory=Counter)  # why the unanswered were not


def _answered(s: socket.socket) -> bool:
    try:
        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # bytes or EOF: the agent spoke
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _slow_clients(
    path: str,
    count: int,
    drip_s: float,
    reconnect: bool,
    stop: threading.Event,
    result: SiegeResult,
) -> None:
    """`count` clients that each send a header line every `drip_s` and never finish."""
    socks: dict[int, socket.socket] = {}
    done: set[int] = set()
    while not stop.is_set():
        for i in range(count):
            if i in done:
                continue
            s = socks.get(i)
            if s is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(path)
                    s.send(b"GET /v2 HTTP/1.1\r\nhost: x\r\n")
                except OSError:
                    s.close()  # backlog full: try again next round
                    continue
                socks[i] = s
                continue
            if not _answered(s):
                try:
                    s.send(b"x-slow: 1\r\n")
                    continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
            result.slow_cut += 1
            s.close()
            del socks[i]
            if not reconnect:
                done.add(i)
        stop.wait(drip_s)
    for s in socks.values():
        s.close()


def _good_request(path: str) -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)  # hang guard
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # Refused before it read the request: the answer is still there to read.
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return parse_answer(data).status


def siege(
    agent: AgentProcess,
    slow: int = 64,
    fd_limit: int | None = None,
    seconds: float = 20.0,
    drip_s: float = 1.0,
    reconnect: bool = True,
    until_served: bool = False,
) -> SiegeResult:
    """Slow clients hold connections while a good client asks every 50 ms; with
    `fd_limit`, the agent's RLIMIT_NOFILE is lowered first (as LimitNOFILE= would)."""
    process = psutil.Process(agent.proc.pid)
    if fd_limit is not None:
        resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (fd_limit, fd_limit))
    result = SiegeResult()
    stop = threading.Event()
    attacker = threading.Thread(
        target=_slow_clients,
        args=(str(agent.socket), slow, drip_s, reconnect, stop, result),
        daemon=True,
    )
    attacker.start()
    start = time.monotonic()
    try:
        stop.wait(min(1.0, seconds / 4))  # the slow clients connect first
        while time.monotonic() - start < seconds:
            result.attempted += 1
            t = time.perf_counter()
            try:
                status = _good_request(str(agent.socket))
            except OSError as exc:
                status = None
                result.errors[type(exc).__name__] += 1
            if status is not None:
                result.answered += 1
            if status == 200:
                result.served += 1
                result.latencies_ms.append((time.perf_counter() - t) * 1000)
                if result.first_served_s is None:
                    result.first_served_s = time.monotonic() - start
                    if until_served:
                        break
            result.peak_threads = max(result.peak_threads, process.num_threads())
            time.sleep(0.05)
    finally:
        stop.set()
        attacker.join(timeout=30)
    return result
