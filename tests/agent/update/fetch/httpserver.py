"""A real HTTP(S) server for fetch tests: `ThreadingHTTPServer` in a thread.

Each path is a `Route`: a file served with Range / ETag / If-Range like a static
file server, or a raw answer written byte for byte (for hostile servers), or a
redirect. Requests seen are recorded (method, path, headers) so tests can check
what the fetcher asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from tests.mqtt_broker import Pki

RANGE_RE = re.compile(r"bytes=(\d+)-")


@dataclass
class Route:
    data: bytes = b""
    etag: str | None = '"v1"'
    last_modified: str | None = None
    honour_range: bool = True
    status: int = 200
    location: str | None = None  # a redirect (status 301/302/307/308)
    raw: Callable[[BaseHTTPRequestHandler], None] | None = None  # write the answer yourself
    drip_s: float = 0.0  # sleep between 1 KiB pieces of the body
    # Failures before success: answer this status for the first N requests.
    fail_first: int = 0
    fail_status: int = 503
    hits: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class HttpServer:
    directory: Path
    routes: dict[str, Route] = field(default_factory=dict)
    pki: Pki | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                server.seen.append(Seen(self.path, dict(self.headers.items())))
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    self._simple(404, b"no such file\n")
                    return
                route.hits += 1
                if route.hits <= route.fail_first:
                    self._simple(route.fail_status, b"try again\n")
                    return
                if route.raw is not None:
                    route.raw(self)
                    return
                if route.location is not None:
                    self.send_response(route.status)
                    self.send_header("Location", route.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.status != 200:
                    self._simple(route.status, b"nope\n")
                    return
                self._file(route)

            def _simple(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, route: Route) -> None:
                data, start = route.data, 0
                m = RANGE_RE.fullmatch(self.headers.get("Range", ""))
                if_range = self.headers.get("If-Range")
                fresh = if_range is None or if_range in (route.etag, route.last_modified)
                if m and route.honour_range and fresh:
                    start = int(m[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if route.etag:
                    self.send_header("ETag", route.etag)
                if route.last_modified:
                    self.send_header("Last-Modified", route.last_modified)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = memoryview(data)[start:]
                step = 1024 if route.drip_s else 256 * 1024
                with contextlib.suppress(OSError):
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i : i + step])
                        if route.drip_s:
                            self.wfile.flush()
                            time.sleep(route.drip_s)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # Clients that drop mid-answer are the point of these tests, not news.
        self.httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
        if self.pki is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def scheme(self) -> str:
        return "https" if self.pki is not None else "http"

    def url(self, path: str, port: int | None = None, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{port or self.port}{path}"

    def __enter__(self) -> HttpServer:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


__all__ = ["HttpServer", "Route", "Seen"]
