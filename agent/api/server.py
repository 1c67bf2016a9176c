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
_INLINE_MAX_BODY = 64 * 1024  # decoding more JSON than this would stall the loop
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
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.config.socket is not None:
            path = Path(self.config.socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
            server = await asyncio.start_unix_server(self._client, path=str(path))
            os.chmod(path, 0o660)  # the socket's group decides who may infer
            self.servers.append(server)
            self.addresses.append(f"unix:{path}")
        if self.config.tcp:
            host, _, port = self.config.tcp.rpartition(":")
            host = host.strip("[]")
            server = await asyncio.start_server(self._client, host=host, port=int(port))
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                name = sock.getsockname()
                self.addresses.append(f"tcp:{name[0]}:{name[1]}")
            self.servers.append(server)
        log.info("local API listening on %s", ", ".join(self.addresses))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self.config.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(self.config.socket).unlink()
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # never let one connection take the agent down
            log.exception("unexpected error on an API connection")
        finally:
            self._connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._send(
                    writer, _error(431, "request headers too large", "request.headers"), False
                )
                return
            except asyncio.IncompleteReadError:
                return
            if len(head) > _MAX_HEADER:
                await self._send(
                    writer, _error(431, "request headers too large", "request.headers"), False
                )
                return
            try:
                method, target, version, headers = _parse_head(head)
            except BadRequestError as exc:
                await self._send(writer, _error(400, exc.message, exc.code), False)
                return
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            if "transfer-encoding" in headers:
                await self._send(
                    writer,
                    _error(
                        411,
                        "chunked bodies are not accepted; send Content-Length",
                        "request.length",
                    ),
                    False,
                )
                return
            try:
                length = int(headers.get("content-length", "0"))
                if length < 0:
                    raise ValueError
            except ValueError:
                await self._send(
                    writer, _error(400, "bad Content-Length", "request.malformed"), False
                )
                return
            if length > self.max_body:
                msg = (
                    f"request body of {length} bytes is above the limit of {self.max_body} "
                    "(api.max_request_mb)"
                )
                await self._send(writer, _error(413, msg, TooLargeError.code), False)
                return
            body = await reader.readexactly(length) if length else b""
            try:
                response = await self._route(method, target, headers, body)
            except Exception as exc:  # a bug must cost one request, not the connection
                log.exception("unhandled error serving %s %s", method, target)
                response = _error(500, f"internal error: {type(exc).__name__}", "internal")
            await self._send(writer, response, keep)
            if not keep:
                return

    async def _send(self, writer: asyncio.StreamWriter, response: Response, keep: bool) -> None:
        status, body, headers = response
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        headers = {**headers, "content-length": str(len(body))}
        if not keep:
            headers["connection"] = "close"
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _route(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Response:
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
                return await asyncio.get_running_loop().run_in_executor(
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
        """Run a request on the event loop when it is known to take less than
        `api.inline_below_ms`: a thread handoff costs more than such a model."""
        model = self.host.model
        limit = self.config.inline_below_ms
        if model is None or limit <= 0 or self.host.batching or body_bytes > _INLINE_MAX_BODY:
            return False
        p50 = model.p50_ms
        return p50 is not None and p50 < limit

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
        return _json(200, None, extra)[0], payload, {"content-type": "application/json", **extra}


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


Handler = Callable[[], Awaitable[None]]
