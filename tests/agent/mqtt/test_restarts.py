"""Telemetry and events survive broker crashes: every sequence number arrives."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.protocol.events import EventKind
from agent.protocol.messages import loads
from tests.agent.mqtt.conftest import DEVICE, MakeHarness, agent_config
from tests.mqtt_broker import Broker, Listener


def seqs(listener: Listener, suffix: str) -> list[int]:
    return [loads(p)["seq"] for p in listener.on(suffix)]


def test_broker_killed_and_restarted_mid_stream_loses_nothing(
    tmp: Path, harness: MakeHarness
) -> None:
    # Persistence and a persistent session keep what the broker owes the *listener*
    # across its own restarts; what the device owes is the outbox's job.
    broker = Broker(tmp, persistence=True).start()
    listener = Listener(
        broker,
        [f"edgerun/v1/{DEVICE}/telemetry", f"edgerun/v1/{DEVICE}/events"],
        client_id="restart-listener",
        session=True,
    )
    h = harness(agent_config(tmp, broker, None, telemetry={"interval_s": 0.05},
                             commands={"require_signature": False}))  # fmt: skip
    h.wait_connected()
    stop = threading.Event()

    def tick() -> None:
        n = 0
        while not stop.wait(0.03):
            n += 1
            h.agent.events.emit(EventKind.COMMAND_REFUSED, f"test tick {n}", n=n)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        for _ in range(3):
            time.sleep(0.6)
            broker.kill()
            time.sleep(0.6)  # the device keeps writing into its outbox meanwhile
            assert h.link.outbox.depth().messages > 0
            broker.start()
        time.sleep(0.5)
    finally:
        stop.set()
        ticker.join()
    assert h.link.client.connections >= 4
    h.link.tunables.set({"telemetry.interval_s": 3600.0})  # stop the telemetry stream
    time.sleep(0.2)
    last_telemetry = h.link.outbox.last_seq("telemetry")
    last_event = h.link.outbox.last_seq("event")
    assert last_telemetry > 30 and last_event > 50
    assert listener.wait_for(
        lambda f: (
            set(seqs(f, "/telemetry")) >= set(range(1, last_telemetry + 1))
            and set(seqs(f, "/events")) >= set(range(1, last_event + 1))
        ),
        30,
    ), (
        sorted(set(range(1, last_telemetry + 1)) - set(seqs(listener, "/telemetry"))),
        sorted(set(range(1, last_event + 1)) - set(seqs(listener, "/events"))),
    )
    # Nothing beyond what the device wrote, and nothing dropped on the way.
    assert max(seqs(listener, "/telemetry")) == last_telemetry
    assert h.link.outbox.dropped_total() == {"telemetry": 0, "event": 0}
    assert h.link.outbox.depth().messages == 0
    # Order is kept: a resend after a reconnect may repeat a message, but the first
    # time each one arrives, they come in sequence.
    for stream in ("/telemetry", "/events"):
        first_seen = list(dict.fromkeys(seqs(listener, stream)))
        assert first_seen == sorted(first_seen), stream
    listener.close()
    h.stop()
    broker.stop()
