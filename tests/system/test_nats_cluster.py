"""A real `edge-agent` on a 3-node NATS cluster (MQTT 3.1.1): commands published on
node 2 are answered on node 3, retained status and state read from node 3, and every
subscription the device needs is granted (no `link.subscription_refused`).

The first test pins down what NATS's MQTT gateway refuses, so a nats-server upgrade
that changes it shows here and not as a puzzle in the fleet tests.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.canonical import sign_body
from agent.protocol.messages import Reply, Status, dumps, loads
from agent.protocol.state import ReportedState
from agent.protocol.topics import DeviceTopics, console_reply, group_command
from agent.protocol.update import UpdateStatus
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, AgentProcess, write_config
from tests.mqtt_broker import Listener
from tests.nats_cluster import NatsCluster, NatsNode, available
from tests.update_rig import public_pem

pytestmark = pytest.mark.skipif(not available(), reason="nats-server is not installed")

DEVICE = "press-1"
GROUP = "line-a"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats")) as c:
        yield c


class _Probe:
    """A bare 3.1.1 client: what the broker answers to each SUBSCRIBE and PUBLISH."""

    def __init__(self, node: NatsNode) -> None:
        self.granted: dict[int, list[bool]] = {}
        self.dropped = threading.Event()
        self.got: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"probe-{os.urandom(4).hex()}",
            protocol=paho.MQTTv311,
        )
        self.client.reconnect_delay_set(30, 60)  # a drop stays visible
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_disconnect = lambda *a: self.dropped.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(node.host, node.port, 10)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_subscribe(self, c: object, u: object, mid: int, codes: list[Any], p: object) -> None:
        with self._lock:
            self.granted[mid] = [not code.is_failure for code in codes]

    def _on_message(self, c: object, u: object, msg: Any) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def subscribe(self, *filters: str) -> list[bool]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert mid is not None and _wait(lambda: mid in self.granted), filters
        return self.granted[mid]

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> bool:
        """True once acknowledged; False when the broker closed the connection instead."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        _wait(lambda: info.is_published() or self.dropped.is_set())
        return info.is_published()

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.got if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_what_the_nats_mqtt_gateway_refuses_and_accepts(cluster: NatsCluster) -> None:
    n1, n2, n3 = cluster.nodes
    probe = _Probe(n3)
    try:
        # A '.' (or a space) anywhere in a filter: that filter is refused, the others
        # of the same SUBSCRIBE are granted, and the connection stays.
        assert probe.subscribe(
            "edgerun/v1/d/cmd/ping", "edgerun/v1/d/cmd/config.get", "edgerun/v1/d/cmd/config-get",
            "edgerun/v1/dev.x/state", "edgerun/v1/console/c.1/reply", "edgerun/v1/+/state",
            "$share/workers/edgerun/v1/+/telemetry", "$hw/events/device/ns/n/twin/update",
        ) == [True, False, True, False, False, True, True, True]  # fmt: skip
        assert not probe.dropped.is_set()
        # QoS 1 across nodes, and retained messages read on another node later.
        sender = _Probe(n2)
        assert sender.publish("edgerun/v1/d/cmd/config-get", b"portable")
        assert sender.publish("edgerun/v1/p-1/state", b"kept", retain=True)
        assert _wait(lambda: probe.received("edgerun/v1/d/cmd/config-get") == [b"portable"])
        late = _Probe(n1)
        late.subscribe("edgerun/v1/+/state")
        assert _wait(lambda: ("edgerun/v1/p-1/state", b"kept", True) in late.got)
        late.close()
        # A PUBLISH to a topic with a '.' closes the publisher's connection.
        assert not sender.publish("edgerun/v1/dev.x/state", b"lost")
        assert sender.dropped.is_set()
        sender.close()
        # `$share/...` is granted but taken as a literal topic (NATS 2.9 has no MQTT
        # shared subscriptions): members get nothing of the real topics, and each gets
        # what is published to the literal `$share/...` name.
        a, b, source = _Probe(n1), _Probe(n3), _Probe(n2)
        plain = _Probe(n1)
        shared = "$share/workers/edgerun/v1/+/telemetry"
        assert a.subscribe(shared) == [True] and b.subscribe(shared) == [True]
        assert plain.subscribe("edgerun/v1/+/telemetry") == [True]
        for i in range(8):
            assert source.publish(f"edgerun/v1/s-{i % 4}/telemetry", str(i).encode())
        assert source.publish("$share/workers/edgerun/v1/s-1/telemetry", b"literal")
        assert _wait(lambda: len(plain.got) == 8 and len(a.got) == 1 and len(b.got) == 1)
        assert a.got[0][1] == b.got[0][1] == b"literal", (a.got, b.got)
        for p in (a, b, source, plain):
            p.close()
    finally:
        probe.close()
    # MQTT 5 is refused at CONNECT: NATS speaks 3.1.1 only.
    refused: list[str] = []
    v5 = paho.Client(CallbackAPIVersion.VERSION2, client_id="v5-probe", protocol=paho.MQTTv5)
    v5.on_connect = lambda c, u, f, rc, p: refused.append(str(rc))
    v5.connect(n1.host, n1.port, 10)
    v5.loop_start()
    try:
        assert _wait(lambda: bool(refused)) and "protocol version" in refused[0].lower()
    finally:
        v5.disconnect()
        v5.loop_stop()


# ------------------------------------------------------------------ a real agent


def _agent_config(tmp: Path, node: NatsNode, console_key: Ed25519PrivateKey) -> str:
    console_pub = public_pem(console_key, tmp / "console.pub")
    return "\n".join([
        f'device_id = "{DEVICE}"',
        f'state_dir = "{tmp / "state"}"',
        "[trust]",
        f'public_keys = ["{DEMO_PUB}"]',
        "[api]",
        f'socket = "{tmp / "api.sock"}"',
        "[model]",
        f'bundle = "{SAMPLE_BUNDLE}"',
        "[mqtt]",
        "enabled = true",
        f'host = "{node.host}"',
        f"port = {node.port}",
        'protocol = "3.1.1"',
        f'groups = ["{GROUP}"]',
        "reconnect_min_s = 0.05",
        "reconnect_max_s = 0.5",
        "[telemetry]",
        "interval_s = 0.5",
        "[commands]",
        f'console_keys = ["{console_pub}"]',
    ]) + "\n"  # fmt: skip


class _Console:
    """Publishes signed commands on one node (3.1.1: `reply_to`), reads on another."""

    def __init__(self, send: NatsNode, read: NatsNode, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.reply_topic = str(console_reply(f"c-{uuid.uuid4().hex[:8]}"))
        topics = DeviceTopics(DEVICE)
        self.reader = read.listener(
            [self.reply_topic, str(topics.events), str(topics.status), str(topics.state)]
        )
        self.sender = send.listener([f"edgerun/v1/console/c-{uuid.uuid4().hex[:8]}/reply"])

    def request(self, name: str, args: dict[str, Any] | None = None, to: str = DEVICE,
                timeout: float = 20) -> Reply:  # fmt: skip
        now = time.time()
        body = sign_body(
            {"id": uuid.uuid4().hex, "name": name, "args": args or {}, "issued_at": now,
             "expires_at": now + 60, "to": to, "reply_to": self.reply_topic},
            self.key,
        )  # fmt: skip
        topic = (
            group_command(to.removeprefix("group:"), name)
            if to.startswith("group:")
            else DeviceTopics(DEVICE).command(name)
        )
        assert "." not in str(topic)  # the portable spelling is what a console sends
        self.sender.client.publish(str(topic), dumps(body), qos=1)
        found: list[Reply] = []

        def match(listener: Listener) -> bool:
            for body_bytes in listener.on("/reply"):
                reply = Reply.from_json(loads(body_bytes))
                if reply.id == body["id"]:
                    found.append(reply)
                    return True
            return False

        assert self.reader.wait_for(match, timeout), f"no reply to {name} on {self.reply_topic}"
        return found[0]

    def close(self) -> None:
        self.reader.close()
        self.sender.close()


def test_an_agent_on_node_1_answers_commands_sent_on_node_2_read_on_node_3(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    n1, n2, n3 = cluster.nodes
    key = Ed25519PrivateKey.generate()
    console = _Console(n2, n3, key)
    agent = AgentProcess(write_config(tmp_path / "agent.toml", _agent_config(tmp_path, n1, key)),
                         tmp_path / "api.sock")  # fmt: skip
    try:
        agent.wait_ready(120)

        def online(listener: Listener) -> bool:
            bodies = listener.on("/status")
            return bool(bodies) and Status.from_json(loads(bodies[-1])).state == "online"

        assert console.reader.wait_for(online, 120), agent.output()
        ping = console.request("ping")
        assert ping.ok and ping.result["device_id"] == DEVICE, ping
        got = console.request("config.get", {"keys": ["telemetry.interval_s"]})
        assert got.ok and got.result == {"values": {"telemetry.interval_s": 0.5}}, got
        changed = console.request("config.set", {"values": {"telemetry.interval_s": 0.25}})
        assert changed.ok and changed.result["applied"] == {"telemetry.interval_s": 0.25}
        status = console.request("update.status")
        assert status.ok, status
        assert UpdateStatus.from_json(status.result).running is False
        group = console.request("ping", to=f"group:{GROUP}")
        assert group.ok and group.device_id == DEVICE, group
        # The retained state, read by a console that connects to node 3 only now.
        late = n3.listener([str(DeviceTopics(DEVICE).state), str(DeviceTopics(DEVICE).status)])
        try:

            def tuned(listener: Listener) -> bool:
                bodies = listener.on("/state")
                if not bodies or not listener.on("/status"):  # each retained on its own
                    return False
                state = ReportedState.from_json(loads(bodies[-1]))
                return state.tunable.get("telemetry.interval_s") == 0.25

            assert late.wait_for(tuned, 30)
            state = ReportedState.from_json(loads(late.on("/state")[-1]))
            assert state.groups == (GROUP,) and state.model is not None
            assert Status.from_json(loads(late.on("/status")[-1])).state == "online"
        finally:
            late.close()
        events = [loads(b) for b in console.reader.on("/events")]
        assert events, "no events reached node 3"
        assert not [e for e in events if e["kind"] == "link.subscription_refused"], events
        # NATS refused the legacy dotted subscriptions, and the agent said so once, at info.
        log = agent.output()
        assert log.count("legacy dotted command subscription") == 1, log
        assert "broker refused subscription" not in log, log
    finally:
        agent.stop()
        console.close()
