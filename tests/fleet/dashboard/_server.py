"""A real dashboard server for tests: `create_app` under uvicorn on a free port, in a
thread of the test process, over simulated devices on the test's real mosquitto, a
real FleetClient + FleetView, an SQLite record in a temporary folder and a credentials
file with a known user. Everything is reached over a real socket.

    with DashboardServer(broker, tmp_path, devices=20) as dash:
        status, body = dash.get_json("/api/devices?limit=5")
        s = dash.login()                                   # USER / PASSWORD
        dash.post_json("/api/rollouts/r-1/pause", {}, session=s)
        with dash.sse() as events:                         # GET /api/live
            dash.sim.offline(dash.sim.device_ids[0])
            events.wait(lambda e: e.event == "devices" and ..., timeout_s=10)

`dashboard` (module scope, 20 devices in groups line-1/line-2, telemetry every 0.5 s)
is the shared fixture; the pages' browser tests use it too. A real rollout that the
dashboard then shows:

    engine = dash.engine()
    state = engine.create(dash.plan(["dev-0000", "dev-0001"]), dashboard_bundle)
    threading.Thread(target=engine.drive, args=(state.rollout_id,), daemon=True).start()

(`dashboard_bundle`: the sample model as a signed 2.0.0 bundle; conftest re-exports
both fixtures.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.signing import load_public_key
from fleet.config import FleetConfig
from fleet.dashboard.app import create_app
from fleet.dashboard.auth import COOKIE, Auth, hash_password
from fleet.mqtt import FleetClient
from fleet.rollout.bundle import BundleInfo, inspect_bundle
from fleet.rollout.engine import RolloutEngine
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.sources import console_sources
from fleet.simulate import Simulator
from fleet.store import SqlStore, open_store
from fleet.view import FleetView
from tests.helpers import DEMO_PUB, SampleParts, make_bundle
from tests.mqtt_broker import Broker

USER = "operator"
PASSWORD = "pw-operator-1"
TOKEN = "test-token-0123456789abcdef"
OPERATOR = "dash-tester"  # fleet.toml's operator (the CLI's); actions record the user


@dataclass
class Session:
    cookie: str  # the edgerun_session value
    csrf: str
    user: str


@dataclass
class Event:
    event: str
    data: Any


class SseReader:
    """Reads `GET /api/live` on its own thread; `events` grows as they arrive."""

    def __init__(self, port: int, path: str = "/api/live", timeout_s: float = 30.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        self.events: list[Event] = []
        self.ended = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        name, data = "message", list[str]()
        try:
            while True:
                line = self.response.fp.readline()
                if not line:
                    break
                text = line.decode().rstrip("\r\n")
                if text == "":
                    if data:
                        with self._cond:
                            self.events.append(Event(name, json.loads("\n".join(data))))
                            self._cond.notify_all()
                    name, data = "message", []
                elif text.startswith("event:"):
                    name = text[6:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].strip())
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def wait(
        self, pred: Callable[[Event], bool], timeout_s: float = 10.0, *, start: int = 0
    ) -> Event | None:
        """The first event from `events[start]` on (already seen or to come) for which
        `pred` holds."""
        deadline = time.monotonic() + timeout_s
        seen = start
        with self._cond:
            while True:
                for e in self.events[seen:]:
                    if pred(e):
                        return e
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    return None
                self._cond.wait(min(left, 0.2))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.sock and self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self._thread.join(5)

    def __enter__(self) -> SseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunningApp:
    """An ASGI app under a real uvicorn on 127.0.0.1:<free port>, in a thread."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,
                                timeout_graceful_shutdown=2)  # fmt: skip
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the dashboard server did not start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the dashboard server did not start in 20 s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)


def serve_app(app: Any) -> RunningApp:
    return RunningApp(app)


@dataclass
class DashboardServer:
    broker: Broker
    directory: Path
    devices: int = 20
    groups: Any = ("line-1", "line-2")
    telemetry_interval_s: float = 0.5
    connections: int | None = None
    prefix: str = "dev"
    app_options: dict[str, Any] = field(default_factory=dict)
    sim_options: dict[str, Any] = field(default_factory=dict)
    credentials: bool = True
    db: str | None = None  # a postgresql://… URL; default: an SQLite file in `directory`

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = Ed25519PrivateKey.generate()
        self.key_file = self.directory / "console.key"
        self.key_file.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.key_file.chmod(0o600)
        self.pub_file = self.directory / "console.pub"
        self.pub_file.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.credentials_file = self.directory / "credentials"
        self.credentials_file.write_text(f"# test user\n{USER}:{hash_password(PASSWORD)}\n")
        self.token_file = self.directory / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.db_path = self.directory / "fleet.db"
        self._stack: list[Callable[[], Any]] = []

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> DashboardServer:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        options: dict[str, Any] = {
            "prefix": self.prefix,
            "groups": list(self.groups) if self.groups else None,
            "console_keys": [self.pub_file],
            "telemetry_interval_s": self.telemetry_interval_s,
            "latency": 0.02,
            "model": ("digits", "1.0.0"),
            "connections": self.connections,
        }
        options.update(self.sim_options)
        self.sim = Simulator(self.broker.host, self.broker.port, self.devices, **options)
        self.sim.__enter__()
        self._stack.append(self.sim.close)
        self.config = FleetConfig.load(
            None,
            broker=f"mqtt://{self.broker.host}:{self.broker.port}",
            key=str(self.key_file),
            operator=OPERATOR,
            console_id=f"dash-{uuid.uuid4().hex[:6]}",
            timeout_s=5,
        )
        self.client = FleetClient(self.config).connect()
        self._stack.append(self.client.close)
        self.view = FleetView(self.client).start(settle_s=10)
        self._stack.append(self.view.close)
        ids = set(self.sim.device_ids)
        ok = self.view.wait(
            lambda v: all((r := v.row(d)) is not None and r.online and r.model_version
                          for d in ids), 30)  # fmt: skip
        assert ok, "the simulated devices did not all show up in the view"
        self.store: SqlStore = open_store(self.db or self.db_path)
        self._stack.append(self.store.close)
        auth = (
            Auth.from_files(str(self.credentials_file), str(self.token_file),
                            session_ttl_s=self.app_options.pop("session_ttl_s", 3600.0))
            if self.credentials else Auth()
        )  # fmt: skip
        self.auth = auth
        self.app = create_app(self.view, self.store, self.client.key_id, auth, **self.app_options)
        self.running = serve_app(self.app)
        self._stack.append(self.running.stop)
        self.port = self.running.port
        self.url = self.running.url

    def close(self) -> None:
        while self._stack:
            fn = self._stack.pop()
            with contextlib.suppress(Exception):  # closing the rest matters more
                fn()

    @property
    def hub(self) -> Any:
        return self.app.state.hub

    @property
    def retention(self) -> Any:
        return self.app.state.retention

    # ------------------------------------------------------------------ HTTP

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        session: Session | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            hdrs = dict(headers or {})
            if session is not None:
                hdrs["Cookie"] = f"{COOKIE}={session.cookie}"
            conn.request(method, path, body=body, headers=hdrs)
            response = conn.getresponse()
            data = response.read()
            # Repeated headers (Set-Cookie) joined, names lower-case.
            out: dict[str, str] = {}
            for k, v in response.getheaders():
                out[k.lower()] = f"{out[k.lower()]}, {v}" if k.lower() in out else v
            return response.status, out, data
        finally:
            conn.close()

    def get_json(self, path: str, session: Session | None = None) -> tuple[int, Any]:
        status, _, data = self.request("GET", path, session=session)
        return status, json.loads(data)

    def post_json(
        self,
        path: str,
        body: Any,
        *,
        session: Session | None = None,
        csrf: str | bool | None = True,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """`csrf=True`: the session's token; a string: that one; None/False: none."""
        headers = {"Content-Type": content_type}
        token = session.csrf if csrf is True and session is not None else csrf
        if isinstance(token, str):
            headers["X-CSRF-Token"] = token
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, data = self.request("POST", path, raw, headers, session)
        return status, json.loads(data) if data else None

    def login(self, user: str = USER, password: str = PASSWORD) -> Session:
        status, headers, data = self.request(
            "POST", "/api/login", json.dumps({"user": user, "password": password}).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 200, (status, data)
        cookie = headers["set-cookie"].split(";")[0].split("=", 1)[1]
        body = json.loads(data)
        return Session(cookie, body["csrf"], body["user"])

    def sse(self, path: str = "/api/live") -> SseReader:
        return SseReader(self.port, path)

    # ------------------------------------------------------------------ rollouts

    def engine(self, **kw: Any) -> RolloutEngine:
        """A real rollout engine on this server's client, view and store (bundles over
        HTTP from 127.0.0.1), quick ticks for tests."""
        options: dict[str, Any] = {
            "operator": OPERATOR,
            "sources": console_sources(self.client, "127.0.0.1", [load_public_key(DEMO_PUB)]),
            "tick_s": 0.05,
            "lease_ttl_s": 5.0,
            "command_timeout_s": 5.0,
        }
        options.update(kw)
        return RolloutEngine(self.store, self.view, self.client, **options)

    def plan(self, devices: list[str], **kw: Any) -> RolloutPlan:
        options: dict[str, Any] = {
            "targets": tuple(devices),
            "canary": 1,
            "wave": "50%",
            "soak_s": 0.3,
            "device_timeout_s": 10.0,
            "gates": "p95_ms<=1.5x,error_rate<=0.05",
        }
        options.update(kw)
        return RolloutPlan(**options)


@pytest.fixture(scope="module")
def dashboard(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DashboardServer]:
    """A dashboard over 20 simulated devices (groups line-1, line-2; telemetry every
    0.5 s) with the user USER / PASSWORD and the token TOKEN."""
    with DashboardServer(broker, tmp_path_factory.mktemp("dashboard")) as d:
        yield d


@pytest.fixture(scope="module")
def dashboard_bundle(
    tmp_path_factory: pytest.TempPathFactory, sample_parts: SampleParts, demo_key: Any
) -> BundleInfo:
    """A real signed bundle of the sample model, version 2.0.0, verified as deploy does."""
    path = make_bundle(
        sample_parts, tmp_path_factory.mktemp("bundle") / "digits-2.0.0.edgebundle", demo_key,
        version="2.0.0",
    )  # fmt: skip
    return inspect_bundle(path, [load_public_key(DEMO_PUB)])
