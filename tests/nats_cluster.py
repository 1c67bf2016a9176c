"""A real 3-node nats-server cluster with JetStream and an MQTT listener per node.

    with NatsCluster(tmp_path) as cluster:
        node = cluster.nodes[0]          # .host, .port (MQTT), so tests.mqtt_broker.Listener
        Listener(node, [...], protocol=4)  # and agents connect to it like to a Broker

NATS speaks MQTT 3.1.1 only, and its MQTT gateway keeps sessions, retained messages
and QoS 1 in JetStream, which in a cluster needs a meta leader: `start()` returns
once every route is up, JetStream is ready on every node and each node's MQTT
listener answered a CONNECT with "accepted". Free ports for everything; each node has
its own config file and JetStream store under the given directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.mqtt_broker import Broker, Listener, free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
CLUSTER_NAME = "edgerun-test"


class PortTakenError(RuntimeError):
    """A node could not bind one of its ports."""


def available() -> bool:
    return os.access(NATS_SERVER, os.X_OK)


@dataclass
class NatsNode:
    name: str
    directory: Path
    client_port: int  # NATS protocol
    route_port: int  # cluster routes
    monitor_port: int  # HTTP monitoring (/varz, /routez, /jsz)
    port: int  # the MQTT listener (what agents and consoles connect to)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def config(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def monitor(self, path: str) -> dict[str, object]:
        url = f"http://{self.host}:{self.monitor_port}/{path}"
        with urllib.request.urlopen(url, timeout=2) as answer:
            data: dict[str, object] = json.loads(answer.read())
        return data

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def listener(self, filters: list[str], **kw: Any) -> Listener:
        """A tests.mqtt_broker Listener on this node's MQTT (3.1.1: NATS has no MQTT 5)."""
        return Listener(cast(Broker, self), filters, protocol=paho.MQTTv311, **kw)


class NatsCluster:
    def __init__(self, directory: Path, size: int = 3) -> None:
        self.directory = Path(directory) / f"nats-{os.urandom(3).hex()}"
        self.directory.mkdir(parents=True)
        self.size = size
        self.nodes: list[NatsNode] = []
        self._layout(0)

    def _layout(self, attempt: int) -> None:
        """Fresh free ports, config files and JetStream stores for every node."""
        self.nodes = []
        for i in range(self.size):
            node_dir = self.directory / f"try{attempt}" / f"n{i + 1}"
            (node_dir / "jetstream").mkdir(parents=True)
            self.nodes.append(
                NatsNode(f"n{i + 1}", node_dir, free_port(), free_port(), free_port(), free_port())
            )
        for node in self.nodes:
            node.config.write_text(self._config(node))

    def _config(self, node: NatsNode) -> str:
        routes = ", ".join(
            f'"nats-route://127.0.0.1:{other.route_port}"'
            for other in self.nodes
            if other is not node
        )
        return "\n".join(
            [
                f'server_name: "{node.name}"',
                f"listen: 127.0.0.1:{node.client_port}",
                f"http: 127.0.0.1:{node.monitor_port}",
                "jetstream {",
                f'  store_dir: "{node.directory / "jetstream"}"',
                "  max_memory_store: 64MB",
                "  max_file_store: 256MB",
                "}",
                "cluster {",
                f'  name: "{CLUSTER_NAME}"',
                f"  listen: 127.0.0.1:{node.route_port}",
                f"  routes: [{routes}]",
                "}",
                "mqtt {",
                f"  listen: 127.0.0.1:{node.port}",
                # A QoS 1 message not acknowledged is sent again after this long.
                "  ack_wait: 5s",
                "}",
                "",
            ]
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0, attempts: int = 3) -> NatsCluster:
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except PortTakenError:
                # Another process took a port between free_port() and the bind (a
                # shared machine): stop what started, take new ports, try again.
                self.stop()
                if attempt == attempts - 1:
                    raise
                self._layout(attempt + 1)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> NatsCluster:
        for node in self.nodes:
            self.start_node(node)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self._wait_routes(node, deadline)
        for node in self.nodes:
            self._wait_mqtt(node, deadline)
        return self

    def start_node(self, node: NatsNode) -> None:
        assert not node.running(), f"{node.name} already running"
        with node.log_path.open("ab") as log:
            node.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(node.config)], stdout=log, stderr=subprocess.STDOUT
            )

    def _check_alive(self) -> None:
        """Every node, not only the one waited on: a node that died stops the others
        from ever forming the cluster."""
        for node in self.nodes:
            self._check_node(node)

    def _check_node(self, node: NatsNode) -> None:
        if node.proc is not None and node.proc.poll() is not None:
            if "address already in use" in node.log():
                raise PortTakenError(f"nats-server {node.name}: a port was taken:\n{node.log()}")
            raise RuntimeError(
                f"nats-server {node.name} exited with {node.proc.returncode}:\n{node.log()}"
            )

    def _wait_routes(self, node: NatsNode, deadline: float) -> None:
        want = len(self.nodes) - 1
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError, ValueError):
                routes = node.monitor("routez").get("num_routes", 0)
                if isinstance(routes, int) and routes >= want:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{node.name}: the cluster did not form:\n{node.log()}")

    def _wait_mqtt(self, node: NatsNode, deadline: float) -> None:
        """MQTT is ready once a CONNECT is accepted (JetStream has a meta leader and the
        gateway made its streams); before that NATS refuses or drops the connection."""
        last = "no answer"
        while time.monotonic() < deadline:
            self._check_alive()
            result = _try_connect(node.host, node.port)
            if result is None:
                return
            last = result
            time.sleep(0.1)
        raise RuntimeError(f"{node.name}: MQTT never accepted a connection ({last}):\n{node.log()}")

    def stop(self) -> None:
        for node in self.nodes:
            _signal(node, signal.SIGTERM)

    def kill(self, node: NatsNode) -> None:
        _signal(node, signal.SIGKILL)

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal(node: NatsNode, sig: signal.Signals) -> None:
    proc = node.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _try_connect(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None when an MQTT 3.1.1 CONNECT is accepted, else why not."""
    accepted = threading.Event()
    why: list[str] = []
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{os.urandom(4).hex()}",
        protocol=paho.MQTTv311,
    )

    def on_connect(c: object, u: object, flags: object, rc: object, props: object) -> None:
        if not getattr(rc, "is_failure", True):
            accepted.set()
        else:
            why.append(str(rc))

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=5)
    except OSError as exc:
        return f"connect: {exc}"
    client.loop_start()
    try:
        accepted.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return None if accepted.is_set() else (why[0] if why else "no CONNACK")
