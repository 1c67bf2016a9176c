"""Shared parts: a signing key, releases, and a real HTTP server for index files."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.update.index import Release, build_index
from tests.agent.mqtt.conftest import broker, harness  # noqa: F401 (the twin tests' fixtures)

NAME = "digits"


def release(version: str, name: str = NAME, **changes: object) -> Release:
    fields: dict[str, object] = {
        "name": name,
        "version": version,
        "sha256": (version.replace(".", "") * 64)[:64].ljust(64, "0"),
        "size": 1000,
        "url": f"https://releases.example/{name}-{version}.edgebundle",
    }
    fields.update(changes)
    return Release(**fields)  # type: ignore[arg-type]


def later(days: float = 30) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(key: Ed25519PrivateKey, counter: int, *releases: Release, days: float = 30) -> bytes:
    return build_index(list(releases), counter, later(days), key)


@dataclass
class Served:
    """Files served by a real HTTP server on 127.0.0.1 (path -> (status, body))."""

    port: int = 0
    files: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    hits: int = 0

    def url(self, path: str = "/index.json") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def http_server() -> Iterator[Served]:
    served = Served()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.hits += 1
            status, body = served.files.get(self.path, (404, b"not found"))
            if status in (301, 302):
                self.send_response(status)
                self.send_header("Location", body.decode())
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the agent stopped reading at its cap
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
