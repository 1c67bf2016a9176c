"""PUBACKs settle only the message they belong to, also after paho's ids wrap at 65,535."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.link.client import Ack, ClientSettings, MqttClient
from agent.link.sender import OutboxSender
from agent.outbox import Outbox, Row
from agent.protocol.topics import Topic
from tests.agent.mqtt.conftest import wait_until
from tests.mqtt_broker import Broker, Listener

ROWS = 6_000  # outbox rows, each deleted only on its own PUBACK
EARLY_ROWS = 1_000  # of them sent alongside the loose publishes, the rest after the wrap
LOOSE = 62_000  # publishes nobody waits for (replies, status, state do this)
ROW_TOPIC = "edgerun/v1/dev-a/events"
LOOSE_TOPIC = "edgerun/v1/console/acks/reply"


def test_more_than_65535_publishes_on_one_connection_settle_only_their_own_rows(
    tmp: Path, broker: Broker
) -> None:
    """ROWS + LOOSE > 65,535 QoS 1 publishes on one connection: loose publishes and
    outbox rows interleaved, then more rows after the wrap, so that mids once used by
    loose publishes are reused by outbox rows. Every row must then be settled by its own PUBACK (delivered by the
    network thread, never from a stash at publish time), nothing may be lost, and no
    bookkeeping may be left over."""
    assert ROWS + LOOSE > 65_535
    listener = Listener(broker, [ROW_TOPIC])
    outbox = Outbox(tmp / "outbox.sqlite", 1 << 30, 86_400, synchronous="normal")
    client = MqttClient(
        ClientSettings(broker.host, broker.port, "acks-dev", max_inflight=200),
    )
    acks: list[tuple[int, str, bool]] = []
    sender = OutboxSender(outbox, client, 200, lambda dropped: None)
    settle = sender._on_ack

    def recording(row: Row, ack: Ack) -> None:
        acks.append((row.seq, threading.current_thread().name, ack.ok))
        settle(row, ack)

    sender._on_ack = recording  # type: ignore[method-assign]
    client.start()
    assert client.wait_connected(10), client.last_error
    sender.start()
    stop = threading.Event()
    sent = 0

    def loose() -> None:
        nonlocal sent

        while sent < LOOSE and not stop.is_set():
            if client.pending_acks() > 400:  # a window: never 65,535 ids in flight
                time.sleep(0.001)
                continue
            client.publish(Topic(LOOSE_TOPIC), b"%d" % sent)
            sent += 1

    side = threading.Thread(target=loose)
    side.start()
    try:
        for seq in range(ROWS):
            if seq == EARLY_ROWS:
                side.join(300)  # the next rows get mids past the wrap
            outbox.put("event", ROW_TOPIC, lambda s: b"%d" % s)
            if seq % 200 == 0:
                sender.kick()
        sender.kick()
        assert wait_until(lambda: outbox.depth().messages == 0, 300), outbox.depth()
        assert listener.wait_for(lambda f: len(f.messages) >= ROWS, 120)
    finally:
        stop.set()
        side.join(10)
        sender.stop()
        client.stop()
        listener.close()
        outbox.close()
    assert sent == LOOSE and client.connections == 1  # all of it on one connection
    assert sender.sent == ROWS
    rows = [int(p) for p in listener.on(ROW_TOPIC)]
    assert sorted(set(rows)) == list(range(1, ROWS + 1))  # nothing lost
    # One ack per row, each from the PUBACK handler on the network thread.
    assert len(acks) == ROWS and {seq for seq, _, _ in acks} == set(range(1, ROWS + 1))
    assert all(ok and thread == "mqtt-net" for _, thread, ok in acks)
    assert client.pending_acks() == 0 and client.unowned_acks == 0
