"""The link side of MQTT bundle transfers: the `ChunkTransport` port (agent/update/ports.py).

Subscriptions here are dynamic (one per transfer while its fetch runs) and renewed
on every connection (`filters()` joins the link's subscribe on connect). Chunk
messages are routed here straight from the network thread, off the command path:
they never queue behind commands nor count against the command inbox.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.config.model import AgentConfig
from agent.link.client import Message, MqttClient, MqttError
from agent.protocol.topics import DeviceTopics, TopicFilter
from agent.protocol.update import DeployRequest
from agent.update.fetch.mqtt import MqttFetcher, MqttSettings
from agent.update.ports import Fetcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Route:
    on_chunk: Callable[[bytes], None]
    on_reconnect: Callable[[], None] | None


class LinkTransfers:
    """Implements ChunkTransport over the link's one MQTT connection."""

    def __init__(self, client: MqttClient, topics: DeviceTopics) -> None:
        self.client = client
        self.topics = topics
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}  # chunk topic -> route
        self.unrouted = 0  # chunk-topic messages for no running transfer

    # ----------------------------------------------------------------- the port

    def subscribe_chunks(
        self,
        transfer_id: str,
        on_chunk: Callable[[bytes], None],
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        topic = str(self.topics.bundle(transfer_id))
        with self._lock:
            self._routes[topic] = _Route(on_chunk, on_reconnect)
        if self.client.connected:
            try:
                self.client.subscribe([TopicFilter(topic)])
            except MqttError as exc:  # lost right now: the next connect subscribes
                log.debug("chunk subscription for %s deferred: %s", transfer_id, exc)

    def unsubscribe_chunks(self, transfer_id: str) -> None:
        topic = str(self.topics.bundle(transfer_id))
        with self._lock:
            self._routes.pop(topic, None)
        if self.client.connected:
            try:
                self.client.unsubscribe([TopicFilter(topic)])
            except MqttError as exc:
                log.debug("chunk unsubscribe for %s not sent: %s", transfer_id, exc)

    def request_chunks(self, transfer_id: str, body: bytes) -> None:
        self.client.publish(self.topics.need(transfer_id), body, qos=1)

    # ----------------------------------------------------------------- link hooks

    def filters(self) -> list[TopicFilter]:
        with self._lock:
            return [TopicFilter(t) for t in self._routes]

    def subscribed(self) -> None:
        """A new connection's subscriptions are in place (network thread)."""
        with self._lock:
            hooks = [r.on_reconnect for r in self._routes.values() if r.on_reconnect]
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("transfer reconnect hook failed")

    def deliver(self, message: Message) -> bool:
        """True when `message` is on a bundle topic (handled here, whatever became of it)."""
        topic = message.topic
        levels = topic.split("/")
        if len(levels) != len(self.topics.root.split("/")) + 2 or not topic.startswith(
            self.topics.root + "/bundle/"
        ):
            return False
        with self._lock:
            route = self._routes.get(topic)
        if route is None:
            self.unrouted += 1
            return True
        try:
            route.on_chunk(message.payload)
        except Exception:
            log.exception("chunk handler for %s failed", topic)
        return True


def mqtt_fetchers(
    transfers: LinkTransfers, config: AgentConfig
) -> Callable[[DeployRequest], Fetcher]:
    """The factory the update jobs call for a `transfer` deploy."""
    settings = MqttSettings.from_config(config.update)

    def build(request: DeployRequest) -> Fetcher:
        return MqttFetcher(transfers, settings)

    return build


__all__ = ["LinkTransfers", "mqtt_fetchers"]
