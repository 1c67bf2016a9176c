"""The console side of MQTT bundle transfers: `ChunkSender` answers a device's "need"
messages by publishing the chunks it lacks (formats: agent/protocol/transfer.py).

    sender = ChunkSender(client, device="dev-1", transfer_id="t-42", bundle=Path("m.bundle"))
    sender.start()          # subscribes to edgerun/v1/dev-1/bundle/t-42/need
    ...                     # send the `deploy` command with {"transfer": "t-42", ...}
    sender.stop()

`client` is a connected paho-mqtt 2.x client whose loop runs (`loop_start`); the
sender adds its callback for the need topic only (`message_callback_add`). The
device asks at start, after silence and after each reconnect, so the sender keeps
no state about what was delivered: each need is answered from the bundle on disk.

`start()` subscribes on the raw paho client and checks no SUBACK; a clean-session
reconnect forgets that subscription. The console subscribes `need_topic` through its
FleetClient instead and feeds `handle_need` (fleet/bundle_source.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from agent.protocol.topics import DeviceTopics
from agent.protocol.transfer import DEFAULT_CHUNK, Chunk, TransferError, chunks_of, decode_need

log = logging.getLogger(__name__)


class ChunkSender:
    """Serve one bundle to one device over MQTT, chunk by chunk, as it asks."""

    def __init__(
        self,
        client: paho.Client,
        device: str,
        transfer_id: str,
        bundle: Path | bytes,
        chunk_size: int = DEFAULT_CHUNK,
        skip: Callable[[int, int], bool] | None = None,
        corrupt: Callable[[Chunk], bytes | None] | None = None,
    ) -> None:
        """`skip(index, times_sent_before)` and `corrupt(chunk)` (return other bytes to
        send instead) are for tests that need a lossy or hostile sender."""
        self.client = client
        self.topics = DeviceTopics(device)
        self.transfer_id = transfer_id
        data = bundle if isinstance(bundle, bytes) else bundle.read_bytes()
        self.chunks = chunks_of(data, chunk_size)
        self.sha256 = self.chunks[0].bundle_sha256
        self.size = len(data)
        self.skip = skip
        self.corrupt = corrupt
        self.sent: dict[int, int] = {}  # index -> times published
        self.needs: list[Any] = []  # the need messages answered (decoded)
        self.bad_needs = 0
        self._lock = threading.Lock()
        self._need_topic = str(self.topics.need(transfer_id))
        self._chunk_topic = str(self.topics.bundle(transfer_id))

    @property
    def total(self) -> int:
        return len(self.chunks)

    @property
    def need_topic(self) -> str:
        """Where the device asks for chunks (whoever subscribes calls `handle_need`)."""
        return self._need_topic

    def start(self) -> ChunkSender:
        self.client.message_callback_add(self._need_topic, self._on_need)
        self.client.subscribe(self._need_topic, qos=1)
        return self

    def stop(self) -> None:
        self.client.message_callback_remove(self._need_topic)
        self.client.unsubscribe(self._need_topic)

    def push(self, indexes: list[int] | None = None) -> int:
        """Publish chunks without being asked (all when None); returns how many."""
        picked = range(self.total) if indexes is None else indexes
        return sum(self._send(i) for i in picked)

    def _on_need(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.handle_need(bytes(msg.payload))

    def handle_need(self, payload: bytes) -> None:
        """Answer one need message (its payload as received on `need_topic`): publish
        the chunks it asks for. For a subscriber other than this sender's own `start()`
        (the console's FleetClient, which waits for the SUBACK and re-subscribes after a
        reconnect)."""
        try:
            need = decode_need(payload)
        except TransferError as exc:
            self.bad_needs += 1
            log.warning("need for %s refused: %s", self.transfer_id, exc.message)
            return
        if (need.transfer_id, need.sha256, need.size) != (
            self.transfer_id,
            self.sha256,
            self.size,
        ) or need.total not in (None, self.total):
            self.bad_needs += 1
            log.warning("need for another bundle on %s ignored", self._need_topic)
            return
        self.needs.append(need)
        wanted = range(self.total) if need.total is None else need.indexes()
        for i in wanted:
            self._send(i)

    def _send(self, index: int) -> bool:
        with self._lock:
            before = self.sent.get(index, 0)
            self.sent[index] = before + 1
        if self.skip is not None and self.skip(index, before):
            return False
        chunk = self.chunks[index]
        payload = chunk.encode()
        if self.corrupt is not None:
            payload = self.corrupt(chunk) or payload
        info = self.client.publish(self._chunk_topic, payload, qos=1)
        return info.rc == paho.MQTT_ERR_SUCCESS


__all__ = ["ChunkSender"]
