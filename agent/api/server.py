"""The local API's HTTP/1.1 server (Unix socket and optional TCP), one thread per connection.

Kept to what the Open Inference Protocol needs: keep-alive, Content-Length bodies,
JSON errors. Blocking sockets with a thread per connection rather than asyncio: a
request is then one recv and one send, with no event-loop wake-ups in between, which
halves the round trip for small models (bench/overhead.py); onnxruntime and LiteRT
release the GIL, so connections run their models in parallel, and a long inference
never delays a health check on another connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
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


class _Refused(Exception):
    """A request the connection answers with an error and then closes."""

    def __init__(self, response: Response) -> None:
        super().__init__(response[0])
        self.response = response


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
        self.addresses: list[str] = []
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        if self.config.socket is not None:
            path = Path(self.config.socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, 0o660)  # the socket's group decides who may infer
            self._listen(sock, f"unix:{path}")
        if self.config.tcp:
            host, _, port = self.config.tcp.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            name = sock.getsockname()
            self._listen(sock, f"tcp:{name[0]}:{name[1]}")
        log.info("local API listening on %s", ", ".join(self.addresses))

    def _listen(self, sock: socket.socket, address: str) -> None:
        sock.listen(128)
        sock.settimeout(0.2)  # accept() wakes up to notice a stop
        self._listeners.append(sock)
        self.addresses.append(address)
        thread = threading.Thread(
            target=self._accept_loop, args=(sock,), name=f"api-accept {address}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in self._listeners:
            sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self.config.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(self.config.socket).unlink()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._stopping.is_set():
                    log.exception("accept failed on the API socket")
                return
            # Blocking socket with a kernel receive timeout: a Python-level timeout
            # would turn every recv into poll + recv.
            conn.setblocking(True)
            seconds = int(self.config.idle_timeout_s)
            micros = int((self.config.idle_timeout_s - seconds) * 1e6)
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros)
            )
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                full = len(self._connections) >= self.config.max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                msg = f"too many connections (api.max_connections = {self.config.max_connections})"
                threading.Thread(
                    target=_refuse, args=(conn, _error(503, msg, "overloaded")), daemon=True
                ).start()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_requests(conn)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client went away or idled out
        except Exception:  # never let one connection take the agent down
            log.exception("unexpected error on an API connection")
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _serve_requests(self, conn: socket.socket) -> None:
        buf = bytearray()
        while not self._stopping.is_set():
            try:
                request = self._read_request(conn, buf)
            except _Refused as refused:
                conn.sendall(_encode(refused.response, keep=False))
                _linger(conn)
                return
            if request is None:
                return
            method, target, headers, body, keep = request
            response = self.dispatch(method, target, headers, body)
            conn.sendall(_encode(response, keep))
            if not keep:
                return

    def _read_request(
        self, conn: socket.socket, buf: bytearray
    ) -> tuple[str, str, dict[str, str], bytes, bool] | None:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEADER:
                raise _Refused(_error(431, "request headers too large", "request.headers"))
            data = conn.recv(65536)
            if not data:
                return None
            buf += data
        if end > _MAX_HEADER:
            raise _Refused(_error(431, "request headers too large", "request.headers"))
        try:
            method, target, version, headers = _parse_head(bytes(buf[: end + 4]))
        except BadRequestError as exc:
            raise _Refused(_error(400, exc.message, exc.code)) from None
        if "transfer-encoding" in headers:
            raise _Refused(
                _error(
                    411, "chunked bodies are not accepted; send Content-Length", "request.length"
                )
            )
        try:
            length = int(headers.get("content-length", "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            raise _Refused(_error(400, "bad Content-Length", "request.malformed")) from None
        if length > self.max_body:
            raise _Refused(
                _error(
                    413,
                    f"request body of {length} bytes is above the limit of {self.max_body} "
                    "(api.max_request_mb)",
                    TooLargeError.code,
                )
            )
        total = end + 4 + length
        while len(buf) < total:
            data = conn.recv(max(65536, total - len(buf)))
            if not data:
                return None
            buf += data
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return method, target, headers, body, keep

    def dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        try:
            return self._route(method, target, headers, body)
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("unhandled error serving %s %s", method, target)
            return _error(500, f"internal error: {type(exc).__name__}", "internal")

    def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
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
                return self._infer(name, version, headers, body)
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


def _refuse(conn: socket.socket, response: Response) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(_encode(response, keep=False))
        _linger(conn)
    conn.close()


def _linger(conn: socket.socket) -> None:
    """Close after a refusal without resetting: closing with unread input sends an RST,
    which can destroy the error reply before the client reads it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        drained = 0
        while drained < (4 << 20) and (chunk := conn.recv(65536)):
            drained += len(chunk)


def _encode(response: Response, keep: bool) -> bytes:
    status, body, headers = response
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if not keep:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


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
