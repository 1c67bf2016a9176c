"""Both ends of an MQTT bundle transfer over a real mosquitto, for tests.

`Device` is the agent's real MQTT client (agent.link.client) with the real
`LinkTransfers` adapter wired the way agent/link/link.py wires it (subscribe its
filters on connect, say "subscribed" after the suback, route messages to it first).
`Console` is a paho client that re-subscribes its senders on every connection.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.link.client import ClientSettings, Message, MqttClient
from agent.link.transfer import LinkTransfers
from agent.protocol.topics import DeviceTopics
from fleet.transfer import ChunkSender
from tests.mqtt_broker import Broker

DEVICE = "fetch-dev"


class Device:
    def __init__(self, broker: Broker, device: str = DEVICE, password: str | None = None) -> None:
        self.topics = DeviceTopics(device)
        self.client = MqttClient(
            ClientSettings(
                broker.host, broker.port, f"{device}-{os.urandom(3).hex()}",
                reconnect_min_s=0.05, reconnect_max_s=0.3, max_packet_bytes=192 * 1024,
                username=device if password else None, password=password,
            ),
            on_connect=self._on_connect,
            on_message=self._on_message,
        )  # fmt: skip
        self.transfers = LinkTransfers(self.client, self.topics)
        self.other: list[Message] = []

    def _on_connect(self) -> None:
        filters = self.transfers.filters()
        if filters:
            self.client.subscribe(filters, on_done=lambda refused: self.transfers.subscribed())

    def _on_message(self, message: Message) -> None:
        if not self.transfers.deliver(message):
            self.other.append(message)

    def __enter__(self) -> Device:
        self.client.start()
        assert self.client.wait_connected(10)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.client.stop()


class Console:
    def __init__(self, broker: Broker, user: tuple[str, str] | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"console-{os.urandom(3).hex()}",
                                  protocol=paho.MQTTv5)  # fmt: skip
        if user is not None:
            self.client.username_pw_set(*user)
        self.client.reconnect_delay_set(0.05, 0.3)  # type: ignore[arg-type]
        self.senders: list[ChunkSender] = []
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, *args: object) -> None:
        for sender in self.senders:
            sender.start()
        self.connected.set()

    def add(self, sender: ChunkSender) -> ChunkSender:
        self.senders.append(sender)
        sender.start()
        return sender

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


__all__ = ["DEVICE", "Console", "Device"]
