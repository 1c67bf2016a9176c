"""A small asyncio HTTP/1.1 server for the local API (Unix socket and optional TCP).

Kept to what the Open Inference Protocol needs: keep-alive, Content-Length bodies,
JSON errors. Decoding, inference and encoding run in a worker thread so the event
loop keeps answering health checks while a model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent import __version__
from agent.api.kserve import (
    HEADER_LENGTH,
    decode_request,
    encode_response,
    tensor_metadata,
    wants_binary,
)
from agent.config.model import ApiConfig
from agent.errors import BadRequestError, ServingError, TooLargeError
from agent.serving import ModelHost

log = logging.getLogger(__name__)

_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
_MAX_HEADER = 16 * 1024
_INLINE_MAX_BODY = 256 * 1024  # decoding more JSON than this would stall the loop
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Response = tuple[int, bytes, dict[str, str]]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return status, json.dumps(body, separators=(",", ":")).encode(), h


def _error(status: int, message: str, code: str) -> Response:
    return _json(status, {"error": message, "code": code})


class ApiServer:
    def __init__(
        self,
        host: ModelHost,
        config: ApiConfig,
        status: Callable[[], dict[str, Any]],
        metrics_text: Callable[[], str],
    ) -> None:
        self.host = host
        self.config = config
        self.status = status
        self.metrics_text = metrics_text
        self.max_body = int(config.max_request_mb * 1024 * 1024)
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix="infer")
        self.servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self._connections: set[_HttpProtocol] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.socket is not None:
            path = Path(self.config.socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
            server = await loop.create_unix_server(lambda: _HttpProtocol(self), path=str(path))
            os.chmod(path, 0o660)  # the socket's group decides who may infer
            self.servers.append(server)
            self.addresses.append(f"unix:{path}")
        if self.config.tcp:
            host, _, port = self.config.tcp.rpartition(":")
            host = host.strip("[]")
            server = await loop.create_server(
                lambda: _HttpProtocol(self), host=host, port=int(port)
            )
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                name = sock.getsockname()
                self.addresses.append(f"tcp:{name[0]}:{name[1]}")
            self.servers.append(server)
        log.info("local API listening on %s", ", ".join(self.addresses))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for protocol in list(self._connections):
            protocol.close()
        for server in self.servers:
            await server.wait_closed()
        if self.config.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(self.config.socket).unlink()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Response | Awaitable[Response]:
        """Answer now, or return an awaitable when the request runs in a worker thread."""
        try:
            return self._route(method, target, headers, body)
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("unhandled error serving %s %s", method, target)
            return _error(500, f"internal error: {type(exc).__name__}", "internal")

    def _route(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Response | Awaitable[Response]:
        path = target.split("?", 1)[0]
        get = method in ("GET", "HEAD")
        if path == "/v2/health/live":
            return _json(200, {"live": True}) if get else _not_allowed()
        if path == "/v2/health/ready":
            if not get:
                return _not_allowed()
            ready = self.host.ready()
            return _json(200 if ready else 503, {"ready": ready})
        if path == "/v2":
            return _json(
                200,
                {
                    "name": "edgerun",
                    "version": __version__,
                    "extensions": ["binary_tensor_data", "edgerun_status"],
                },
            )
        if path == "/metrics":
            text = self.metrics_text().encode()
            return 200, text, {"content-type": "text/plain; version=0.0.4; charset=utf-8"}
        if path == "/v2/edgerun/status":
            return _json(200, self.status())
        match = _MODEL.match(path)
        if match is None:
            return _error(404, f"no such endpoint: {method} {path}", "endpoint.not_found")
        name, version, action = match.group(1), match.group(2), match.group(3)
        try:
            if action == "/infer":
                if method != "POST":
                    return _not_allowed()
                if self._inline(len(body)):
                    return self._infer(name, version, headers, body)
                return asyncio.get_running_loop().run_in_executor(
                    self.executor, self._infer, name, version, headers, body
                )
            if not get:
                return _not_allowed()
            model = self.host.resolve(name, version)
            if action == "/ready":
                return _json(200, {"name": name, "ready": self.host.ready()})
            manifest = model.manifest
            return _json(
                200,
                {
                    "name": manifest.name,
                    "versions": [manifest.version],
                    "platform": {"onnx": "onnxruntime_onnx", "tflite": "tflite"}[
                        model.runtime.format
                    ],
                    "inputs": [tensor_metadata(s) for s in manifest.inputs],
                    "outputs": [tensor_metadata(s) for s in manifest.outputs],
                    "parameters": {
                        "sha256": model.sha256,
                        "labels": list(manifest.labels),
                        "runtime": model.runtime.describe(),
                    },
                },
            )
        except ServingError as exc:
            return _error(exc.status, exc.message, exc.code)

    def _inline(self, body_bytes: int) -> bool:
        """Run a request on the event loop when it should take less than
        `api.inline_below_ms`: handing it to a worker thread and back costs hundreds of
        microseconds on a small board (measured in bench/overhead.py)."""
        model = self.host.model
        limit = self.config.inline_below_ms
        if model is None or limit <= 0 or self.host.batching or body_bytes > _INLINE_MAX_BODY:
            return False
        p50 = model.p50_ms
        if p50 is None:
            return False
        # The body bounds the rows: a binary body is exactly rows x row bytes, a JSON
        # one larger, so this errs toward the worker thread.
        rows = max(1, body_bytes // max(model.row_bytes, 1))
        return p50 * rows < limit

    def _infer(
        self, name: str, version: str | None, headers: dict[str, str], body: bytes
    ) -> Response:
        try:
            header_len = headers.get(HEADER_LENGTH)
            try:
                hlen = int(header_len) if header_len is not None else None
            except ValueError:
                raise BadRequestError(f"{HEADER_LENGTH} is not an integer") from None
            try:
                request, arrays = decode_request(body, hlen)
            except BadRequestError:
                self.host.metrics.error(BadRequestError.code)
                raise
            model, outputs = self.host.infer(name, arrays, version)
            selected = [o["name"] for o in request.get("outputs") or [] if isinstance(o, dict)]
            unknown = [s for s in selected if s not in outputs]
            if unknown:
                raise BadRequestError(
                    f"requested output {unknown[0]!r} does not exist; outputs: {', '.join(outputs)}"
                )
            rid = request.get("id")
            payload, head_len = encode_response(
                model.manifest.name,
                model.manifest.version,
                rid if isinstance(rid, str) else None,
                outputs,
                wants_binary(request),
                selected,
            )
        except ServingError as exc:
            return _error(exc.status, exc.message, exc.code)
        extra = (
            {}
            if head_len is None
            else {
                "inference-header-content-length": str(head_len),
                "content-type": "application/octet-stream",
            }
        )
        return 200, payload, {"content-type": "application/json", **extra}


class _HttpProtocol(asyncio.Protocol):
    """One connection: parse requests from the byte stream, answer them in order.

    A Protocol (callbacks) rather than streams (a coroutine per read): the local API
    serves small requests whose cost is mostly this plumbing.
    """

    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a response is being computed; later requests wait (pipelining)
        self.task: asyncio.Future[None] | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server._connections.discard(self)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._process()

    def _fail(self, status: int, message: str, code: str) -> None:
        self._send(_error(status, message, code), keep=False)

    def _process(self) -> None:
        while not self.busy and not self.closing and self.buffer:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEADER:
                    self._fail(431, "request headers too large", "request.headers")
                return
            if end > _MAX_HEADER:
                self._fail(431, "request headers too large", "request.headers")
                return
            try:
                method, target, version, headers = _parse_head(bytes(self.buffer[: end + 4]))
            except BadRequestError as exc:
                self._fail(400, exc.message, exc.code)
                return
            if "transfer-encoding" in headers:
                self._fail(411, "chunked bodies are not accepted; send Content-Length",
                           "request.length")  # fmt: skip
                return
            try:
                length = int(headers.get("content-length", "0"))
                if length < 0:
                    raise ValueError
            except ValueError:
                self._fail(400, "bad Content-Length", "request.malformed")
                return
            if length > self.server.max_body:
                self._fail(
                    413,
                    f"request body of {length} bytes is above the limit of "
                    f"{self.server.max_body} (api.max_request_mb)",
                    TooLargeError.code,
                )
                return
            total = end + 4 + length
            if len(self.buffer) < total:
                return  # wait for the rest of the body
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            result = self.server.dispatch(method, target, headers, body)
            if isinstance(result, tuple):
                self._send(result, keep)
            else:
                self.busy = True
                self.task = asyncio.ensure_future(self._finish(result, keep))

    async def _finish(self, pending: Awaitable[Response], keep: bool) -> None:
        try:
            response = await pending
        except Exception as exc:
            log.exception("unhandled error in a worker thread")
            response = _error(500, f"internal error: {type(exc).__name__}", "internal")
        self.busy = False
        self._send(response, keep)
        self._process()

    def _send(self, response: Response, keep: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, body, headers = response
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                 f"content-length: {len(body)}"]  # fmt: skip
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if not keep:
            lines.append("connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        if not keep:
            self.closing = True
            self.transport.close()


def _not_allowed() -> Response:
    return _error(405, "method not allowed here", "request.method")


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
        raise BadRequestError("request head is not text") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequestError(f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise BadRequestError(f"malformed header line {line[:100]!r}")
        headers[key.strip().lower()] = value.strip()
    return method, target, version, headers
