"""Helpers for tests that drive simulated devices (fleet/simulate/) or real agents.

    key, pub = console_keypair(tmp_path)
    with Simulator(broker.host, broker.port, 20, console_keys=[pub]) as sim, \\
            SimConsole(broker, key) as console:
        reply = console.request(sim.device_ids[0], "ping")
        console.wait_event(sim.device_ids[0], {"update.committed"})

`SimConsole` is a stand-in console for tests of the devices' side (the real one is
fleet/mqtt.py): it signs commands like the contract says, matches replies by
correlation data (MQTT v5) or by id (3.1.1 `reply_to`), and keeps every retained
status/state, telemetry and event it saw, per device, parsed with the typed readers.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.canonical import sign_body
from agent.protocol.messages import (
    EventMessage,
    Reply,
    Status,
    TelemetryMessage,
    dumps,
    loads,
)
from agent.protocol.topics import (
    DeviceTopics,
    console_reply,
    device_of,
    fleet_filter,
    group_command,
)
from fleet.config import FleetConfig
from fleet.mqtt import FleetClient
from fleet.view import FleetView
from tests.helpers import SampleParts, make_bundle
from tests.mqtt_broker import Broker, Listener

SAMPLE_NAME = "digits"  # the sample bundle's model (models/digits/)


@dataclass
class Console:
    """The console's real client and view, as a module fixture holds them."""

    client: FleetClient
    view: FleetView


@contextlib.contextmanager
def open_console(config: FleetConfig) -> Iterator[Console]:
    """A connected console with its view started (retained state settled), closed after."""
    client = FleetClient(config).connect()
    try:
        view = FleetView(client).start(settle_s=5)
        try:
            yield Console(client, view)
        finally:
            view.close()
    finally:
        client.close()


def sample_bundle_v2(directory: Path, sample_parts: SampleParts, demo_key: Any) -> Path:
    """The sample model signed as version 2.0.0: what the rollout tests deploy."""
    out = directory / f"{SAMPLE_NAME}-2.0.0.edgebundle"
    return make_bundle(sample_parts, out, demo_key, version="2.0.0")


def quick_sim(console_pub: Path, prefix: str) -> tuple[str, dict[str, Any]]:
    """A fresh group and the options of a quick simulator in it (telemetry every 0.2 s,
    20 ms a phase, the sample model at 1.0.0), unique per call."""
    tag = uuid.uuid4().hex[:6]
    group = f"g-{tag}"
    options: dict[str, Any] = {
        "prefix": f"{prefix}{tag}",
        "groups": [group],
        "console_keys": [console_pub],
        "telemetry_interval_s": 0.2,
        "latency": 0.02,
        "model": (SAMPLE_NAME, "1.0.0"),
    }
    return group, options


def console_keypair(directory: Path, name: str = "console") -> tuple[Ed25519PrivateKey, Path]:
    """A fresh console signing key and its public PEM (what devices trust)."""
    key = Ed25519PrivateKey.generate()
    pub = directory / f"{name}-{uuid.uuid4().hex[:6]}.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub


class SimConsole:
    def __init__(
        self,
        broker: Broker,
        key: Ed25519PrivateKey | None,
        *,
        protocol: int = 5,
        streams: tuple[str, ...] = ("status", "state", "telemetry", "events"),
    ) -> None:
        self.key = key
        self.v5 = protocol == 5
        self.console_id = f"c{uuid.uuid4().hex[:8]}"
        self.reply_topic = str(console_reply(self.console_id))
        filters = [self.reply_topic] + [str(fleet_filter(s)) for s in streams]
        self.listener = Listener(broker, filters, protocol=protocol)

    def __enter__(self) -> SimConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.listener.close()

    # ----------------------------------------------------------------- commands

    def body(
        self,
        target: str,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        lifetime_s: float = 60.0,
        issued_at: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A signed command body for `target` (a device id or `group:NAME`); `fields`
        override or (value None) remove fields before signing; `sig` after it."""
        now = time.time() if issued_at is None else issued_at
        body: dict[str, Any] = {"id": uuid.uuid4().hex, "name": name, "args": args or {},
                                "issued_at": now, "expires_at": now + lifetime_s, "to": target}  # fmt: skip
        if not self.v5:
            body["reply_to"] = self.reply_topic
        sig = fields.pop("sig", ...)
        for k, v in fields.items():
            if v is None:
                body.pop(k, None)
            else:
                body[k] = v
        if self.key is not None:
            body = sign_body(body, self.key)
        if sig is None:  # unsigned on purpose
            body.pop("sig", None)
        elif sig is not ...:
            body["sig"] = sig
        return body

    def publish(self, target: str, name: str, body: dict[str, Any] | bytes) -> bytes:
        """Publish on the target's command topic; returns the correlation data."""
        if target.startswith("group:"):
            topic = str(group_command(target[len("group:") :], name))
        else:
            topic = str(DeviceTopics(target).command(name))
        correlation = uuid.uuid4().bytes
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        payload = body if isinstance(body, bytes) else dumps(body)
        self.listener.client.publish(topic, payload, qos=1, properties=props)
        return correlation

    def replies(self) -> list[tuple[Reply, bytes | None]]:
        out = []
        for topic, payload, _, props in list(self.listener.messages):
            if topic == self.reply_topic:
                out.append(
                    (Reply.from_json(loads(payload)), getattr(props, "CorrelationData", None))
                )
        return out

    def request(
        self,
        target: str,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float = 15.0,
        body: dict[str, Any] | bytes | None = None,
        **fields: Any,
    ) -> Reply:
        """Send one command and wait for its reply (by correlation data or id)."""
        sent = body if body is not None else self.body(target, name, args, **fields)
        ident = sent.get("id") if isinstance(sent, dict) else None
        correlation = self.publish(target, name, sent)
        found: list[Reply] = []

        def match(_: Listener) -> bool:
            for reply, corr in self.replies():
                if (self.v5 and corr == correlation) or (not self.v5 and reply.id == ident):
                    found.append(reply)
                    return True
            return False

        if not self.listener.wait_for(match, timeout):
            raise AssertionError(f"no reply to {name} for {target} within {timeout} s")
        return found[0]

    # ----------------------------------------------------------------- what devices sent

    def _bodies(self, stream: str, device: str | None = None) -> list[tuple[str, Any]]:
        suffix = f"/{stream}"
        out = []
        for topic, payload, _, _ in list(self.listener.messages):
            if topic.endswith(suffix) and not topic.startswith(self.reply_topic):
                owner = device_of(topic)
                if owner is not None and (device is None or owner == device) and payload:
                    out.append((owner, loads(payload)))
        return out

    def status(self, device: str) -> Status | None:
        found = self._bodies("status", device)
        return Status.from_json(found[-1][1]) if found else None

    def state(self, device: str) -> dict[str, Any] | None:
        found = self._bodies("state", device)
        return found[-1][1] if found else None

    def states(self) -> dict[str, dict[str, Any]]:
        return dict(self._bodies("state"))

    def statuses(self) -> dict[str, Status]:
        return {d: Status.from_json(b) for d, b in self._bodies("status")}

    def telemetry(self, device: str | None = None) -> list[TelemetryMessage]:
        return [TelemetryMessage.from_json(b) for _, b in self._bodies("telemetry", device)]

    def events(self, device: str, prefix: str = "") -> list[EventMessage]:
        events = [EventMessage.from_json(b) for _, b in self._bodies("events", device)]
        return [e for e in events if e.kind.startswith(prefix)]

    def kinds(self, device: str, prefix: str = "update.") -> list[str]:
        return [e.kind for e in self.events(device, prefix)]

    def wait(self, predicate: Callable[[SimConsole], bool], timeout: float = 15.0) -> bool:
        return self.listener.wait_for(lambda _: predicate(self), timeout)

    def wait_event(
        self, device: str, kinds: set[str], timeout: float = 15.0, after: int = 0
    ) -> EventMessage:
        found: list[EventMessage] = []

        def match(_: SimConsole) -> bool:
            for e in self.events(device):
                if e.kind in kinds and e.seq > after:
                    found.append(e)
                    return True
            return False

        if not self.wait(match, timeout):
            raise AssertionError(
                f"{device}: no event of {sorted(kinds)} in {timeout} s; saw {self.kinds(device, '')}"
            )
        return found[0]

    def wait_state(
        self, device: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        def match(_: SimConsole) -> bool:
            state = self.state(device)
            return state is not None and predicate(state)

        if not self.wait(match, timeout):
            raise AssertionError(
                f"{device}: retained state never matched; last {self.state(device)}"
            )
        state = self.state(device)
        assert state is not None
        return state


FINAL_KINDS = {"update.committed", "update.failed", "update.rolled_back", "update.cancelled"}

__all__ = ["FINAL_KINDS", "SAMPLE_NAME", "SimConsole", "console_keypair"]
