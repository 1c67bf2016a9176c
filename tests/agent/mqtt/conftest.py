"""Fixtures for the MQTT link: a real mosquitto, console keys, an in-process agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.loader import parse_config
from agent.link.link import Link
from agent.protocol.canonical import sign_body
from agent.protocol.messages import dumps, loads
from agent.protocol.topics import DeviceTopics, console_reply
from agent.service import Agent
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE
from tests.mqtt_broker import Broker, Listener

DEVICE = "dev-a"


@pytest.fixture
def broker(tmp: Path) -> Iterator[Broker]:
    with Broker(tmp) as b:
        yield b


@pytest.fixture(scope="session")
def console_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def console_pub(tmp: Path, console_key: Ed25519PrivateKey) -> Path:
    path = tmp / "console.pub"
    path.write_bytes(
        console_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def agent_config(
    tmp: Path, broker: Broker | None, console_pub: Path | None, **sections: dict[str, Any]
) -> dict[str, Any]:
    """An agent config as a dict: sample model, fast telemetry and reconnects."""
    mqtt: dict[str, Any] = {"enabled": True, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5}
    if broker is not None:
        mqtt["port"] = broker.port
    data: dict[str, Any] = {
        "device_id": DEVICE,
        "state_dir": str(tmp / "state"),
        "trust": {"public_keys": [str(DEMO_PUB)]},
        "api": {"socket": str(tmp / "api.sock")},
        "model": {"bundle": str(SAMPLE_BUNDLE)},
        "mqtt": mqtt,
        "telemetry": {"interval_s": 0.2},
        "commands": {"console_keys": [str(console_pub)] if console_pub else []},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


class Harness:
    """A real Agent (model loaded, no API server) with its Link on a private loop."""

    def __init__(self, data: dict[str, Any], environ: dict[str, str] | None = None) -> None:
        self.config = parse_config(data, environ={})
        # As cmd_run does; the link's `logs` ring sees what passes the root level.
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(self.config.log_level.upper())
        self.agent = Agent(self.config)
        # As `edge-agent run` does: components first, then the model (its events queue).
        self.link = Link(self.agent, environ=environ)
        self.agent.load_initial_model()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self.link.start())
        self.stopped = False

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def wait_connected(self, timeout: float = 10) -> None:
        assert self.link.online.wait(timeout), self.link.client.last_error

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._call(self.link.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.agent.host.close()
        logging.getLogger().setLevel(self._level)


MakeHarness = Callable[..., Harness]


@pytest.fixture
def harness() -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def make(data: dict[str, Any], environ: dict[str, str] | None = None) -> Harness:
        h = Harness(data, environ)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


class Console:
    """Sends (signed) commands and waits for their replies, over MQTT v5 or 3.1.1."""

    def __init__(
        self, broker: Broker, key: Ed25519PrivateKey | None, protocol: int = 5, **kw: Any
    ) -> None:
        self.key = key
        self.protocol = protocol
        self.reply_topic = str(console_reply(f"c{uuid.uuid4().hex[:8]}"))
        self.listener = Listener(broker, [self.reply_topic], protocol=protocol, **kw)

    def body(self, name: str, args: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": fields.pop("id", uuid.uuid4().hex),
            "name": name,
            "args": args or {},
            "issued_at": time.time(),
            "expires_at": time.time() + 30,
            "to": DEVICE,
            **fields,
        }
        body = {k: v for k, v in body.items() if v is not None}  # field=None leaves it out
        if self.protocol != 5:
            body["reply_to"] = self.reply_topic
        return sign_body(body, self.key) if self.key is not None else body

    def send_raw(self, topic: str, payload: bytes, correlation: bytes | None = None) -> bytes:
        correlation = correlation or uuid.uuid4().bytes
        props = None
        if self.protocol == 5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        self.listener.client.publish(topic, payload, qos=1, properties=props)
        return correlation

    def request(
        self, name: str, args: dict[str, Any] | None = None, device: str = DEVICE,
        topic: str | None = None, timeout: float = 10, **fields: Any,
    ) -> dict[str, Any]:  # fmt: skip
        body = self.body(name, args, **{"to": device, **fields})
        return self.request_body(body, topic or str(DeviceTopics(device).command(name)), timeout)

    def request_body(self, body: dict[str, Any], topic: str, timeout: float = 10) -> dict[str, Any]:
        return self.request_raw(dumps(body), topic, timeout, body.get("id"))

    def request_raw(
        self, payload: bytes, topic: str, timeout: float = 10, ident: str | None = None
    ) -> dict[str, Any]:
        correlation = self.send_raw(topic, payload)
        found: list[dict[str, Any]] = []

        def match(listener: Listener) -> bool:
            for _, body, _, props in listener.messages:
                if self.protocol == 5:
                    if getattr(props, "CorrelationData", None) == correlation:
                        found.append(loads(body))
                        return True
                else:
                    reply = loads(body)
                    if reply.get("id") == ident:
                        found.append(reply)
                        return True
            return False

        assert self.listener.wait_for(match, timeout), f"no reply to {payload[:200]!r} on {topic}"
        return found[0]

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def console(broker: Broker, console_key: Ed25519PrivateKey) -> Iterator[Console]:
    c = Console(broker, console_key)
    yield c
    c.close()


@contextlib.contextmanager
def listening(broker: Broker, *filters: str, **kw: Any) -> Iterator[Listener]:
    listener = Listener(broker, list(filters), **kw)
    try:
        yield listener
    finally:
        listener.close()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def json_on(listener: Listener, suffix: str) -> list[dict[str, Any]]:
    return [loads(p) for p in listener.on(suffix)]
