"""The agent as a KubeEdge device: report `actual` twin values, take desired ones.

A desired `model_version` will start a deploy once deploys over MQTT exist; for now
it is recorded (shown in the reported state) and announced as a `twin.desired` event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.link.client import MqttClient, MqttError
from agent.protocol import twin
from agent.protocol.messages import ProtocolError
from agent.protocol.topics import TopicFilter, TwinTopics

log = logging.getLogger(__name__)

MAX_TWIN_BYTES = 64 * 1024  # a twin document of the properties below is far smaller
MAX_DESIRED = 32  # desired properties remembered (model_version is the one used)


class TwinLink:
    def __init__(
        self,
        topics: TwinTopics,
        client: MqttClient,
        actual: Callable[[], dict[str, str]],
        emit: Callable[..., Any],
    ) -> None:
        self.topics = topics
        self.client = client
        self.actual = actual
        self.emit = emit
        self.desired: dict[str, str] = {}
        self._reported: dict[str, str] | None = None
        self._lock = threading.Lock()

    def filters(self) -> list[TopicFilter]:
        return [
            TopicFilter(str(self.topics.update_delta)),
            TopicFilter(str(self.topics.get_result)),
        ]

    def handles(self, topic: str) -> bool:
        return topic in (str(self.topics.update_delta), str(self.topics.get_result))

    def on_connect(self) -> None:
        """After the link subscribed (to `filters()` too): ask for the twin, and forget
        what was reported so the next `report` (the link's, right after) sends it once."""
        with self._lock:
            self._reported = None
        try:
            self.client.publish(self.topics.get, twin.encode_get())
        except MqttError as exc:
            log.debug("twin get not sent: %s", exc)

    def stopped(self) -> None:
        """A clean stop: the twin must not go on saying `health: ready`."""
        self.report(override={"health": "stopped"})

    def report(self, force: bool = False, override: dict[str, str] | None = None) -> None:
        """Publish the actual values when they changed (or always, with `force`)."""
        values = {**self.actual(), **(override or {})}
        values = {k: _cut(v) for k, v in values.items()}
        with self._lock:
            if not force and values == self._reported:
                return
            self._reported = values
        try:
            self.client.publish(self.topics.update, twin.encode_update(values))
        except MqttError as exc:
            log.debug("twin update not sent: %s", exc)
            with self._lock:
                self._reported = None  # try again on the next change or connect

    def handle(self, payload: bytes) -> None:
        if len(payload) > MAX_TWIN_BYTES:
            log.warning(
                "ignoring a twin message of %d bytes (the limit is %d)",
                len(payload),
                MAX_TWIN_BYTES,
            )
            return
        try:
            doc = twin.decode(payload)
        except ProtocolError as exc:
            log.warning("ignoring a twin message: %s", exc.message)
            return
        desired = doc.desired()
        changed = {k: v for k, v in desired.items() if self.desired.get(k) != v}
        # The desired set lives in memory and in every retained state: bounded, so a
        # twin that names ever new properties cannot grow it without end.
        room = MAX_DESIRED - len(self.desired)
        fresh = [k for k in changed if k not in self.desired]
        if len(fresh) > room:
            dropped = sorted(fresh)[max(room, 0) :]
            log.warning(
                "twin names more than %d desired properties; ignoring %s", MAX_DESIRED,
                ", ".join(dropped[:5]),
            )  # fmt: skip
            for key in dropped:
                del changed[key]
        if not changed:
            return
        self.desired.update(changed)
        version = changed.get("model_version")
        if version is not None:
            current = self.actual().get("model_version", "")
            if version != current:
                self.emit(
                    "twin.desired",
                    f"KubeEdge twin wants model_version {version} (running {current or 'none'}); "
                    "recorded: deploys over MQTT come in a later release",
                    model_version=version,
                    event_id=doc.event_id,
                )


def _cut(value: str) -> str:
    """At most MAX_VALUE_BYTES of UTF-8, cut on a character boundary."""
    data = value.encode("utf-8", "replace")[: twin.MAX_VALUE_BYTES]
    return data.decode("utf-8", "ignore")
