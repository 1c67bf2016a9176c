"""`GET /api/live`, the server-sent events stream, over real sockets: device changes
from the simulated fleet (real MQTT), rollout records from the store, and a client that
never reads, which must be dropped without holding up the others."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from fleet.dashboard.live import encode
from fleet.rollout.bundle import BundleInfo
from fleet.rollout.control import load, request
from tests.fleet.dashboard._server import USER, DashboardServer, Event
from tests.mqtt_broker import Broker

QUEUE = 16


@pytest.fixture(scope="module")
def dash(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardServer]:
    with DashboardServer(
        broker, tmp_path_factory.mktemp("live"), devices=10, prefix="lv",
        app_options={"live_queue": QUEUE},
    ) as d:  # fmt: skip
        yield d


def _rows(e: Event) -> dict[str, dict[str, object]]:
    return {r["device_id"]: r for r in e.data["rows"]} if e.event == "devices" else {}


def test_the_stream_opens_with_a_ping_and_carries_changed_rows(dash: DashboardServer) -> None:
    with dash.sse() as live:
        assert live.response.status == 200
        first = live.wait(lambda e: True, 5)
        assert first is not None and first.event == "ping"
        # Telemetry every 0.5 s: rows change, and come coalesced with the fleet's size.
        e = live.wait(lambda e: e.event == "devices", 10)
        assert e is not None and e.data["total"] == 10
        row = e.data["rows"][0]
        assert {"device_id", "online", "p95_ms", "age_s", "health_class"} <= set(row)
        assert len(_rows(e)) == len(e.data["rows"])  # each device once per event


def test_a_device_going_offline_arrives_as_a_devices_event(dash: DashboardServer) -> None:
    device = "lv-0004"
    with dash.sse() as live:
        assert live.wait(lambda e: e.event == "ping", 5)
        dash.sim.offline(device)
        try:
            e = live.wait(lambda e: _rows(e).get(device, {}).get("online") is False, 10)
            assert e is not None, "the device going offline never reached the stream"
            row = _rows(e)[device]
            assert row["health_class"] == "offline" and row["reason"]
        finally:
            dash.sim.online(device)
        back = live.wait(lambda e: _rows(e).get(device, {}).get("online") is True, 10)
        assert back is not None and _rows(back)[device]["health_class"] in ("ok", "unknown")


def test_a_rollout_that_gets_records_is_announced(
    dash: DashboardServer, dashboard_bundle: BundleInfo
) -> None:
    with dash.sse() as live:
        assert live.wait(lambda e: e.event == "ping", 5)
        rid = dash.engine().create(dash.plan(["lv-0000"]), dashboard_bundle).rollout_id
        e = live.wait(lambda e: e.event == "rollout" and e.data["id"] == rid, 10)
        assert e is not None and e.data["summary"]["phase"] == "created"
        # Another record (an abort request from any console): announced again, with the
        # state it makes.
        seen = len(live.events)
        request(dash.store, rid, "abort", ("k", USER))
        again = live.wait(lambda e: e.event == "rollout" and e.data["id"] == rid, 10, start=seen)
        assert again is not None and again.data["summary"]["phase"] == "aborting"
        # Folded incrementally by the hub, the same as folding the whole record again.
        assert again.data["summary"] == load(dash.store, rid).summary()


def test_a_client_that_never_reads_is_dropped_and_the_others_keep_going(
    dash: DashboardServer,
) -> None:
    hub = dash.hub
    dropped = hub.dropped
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: fills fast
    slow.connect(("127.0.0.1", dash.port))
    slow.sendall(b"GET /api/live HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    try:
        with dash.sse() as live:
            assert live.wait(lambda e: e.event == "ping", 5)
            deadline = time.monotonic() + 30
            while hub.clients < 2:  # both streams are up
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # A burst bigger than any socket buffer (what thousands of changing rows make),
            # put through the hub as the fleet's own events are.
            burst = encode("burst", {"pad": "x" * 64_000})
            sent = 0
            while hub.dropped == dropped:
                assert time.monotonic() < deadline, "the slow client was never dropped"
                hub._loop.call_soon_threadsafe(hub.broadcast, burst)
                sent += 1
                time.sleep(0.005)
            assert hub.dropped == dropped + 1 and hub.clients == 1

            # The reader that reads stays connected, gets the whole burst, and the fleet's
            # own events keep coming to it.
            def bursts() -> int:
                return sum(e.event == "burst" for e in live.events)

            assert live.wait(lambda e: bursts() >= sent, 15) is not None, (bursts(), sent)
            seen = len(live.events)
            assert live.wait(lambda e: e.event == "devices", 10, start=seen)
            assert not live.ended
    finally:
        slow.close()


def test_a_stream_for_some_devices_carries_only_their_rows(dash: DashboardServer) -> None:
    with (
        dash.sse("/api/live?devices=lv-0001,lv-0002") as mine,
        dash.sse("/api/live?devices=") as none,
        dash.sse() as every,
    ):
        # Telemetry every 0.5 s from each device: several events for both devices.
        got: set[str] = set()
        deadline = time.monotonic() + 10
        while got != {"lv-0001", "lv-0002"}:
            assert time.monotonic() < deadline, got
            e = mine.wait(lambda e: e.event == "devices", 5, start=len(mine.events))
            assert e is not None
            got |= set(_rows(e))
        assert every.wait(lambda e: len(_rows(e)) >= 3, 10)  # the others see every row
        assert all(set(_rows(e)) <= {"lv-0001", "lv-0002"} for e in mine.events)
        assert all(e.data["total"] == 10 for e in mine.events if e.event == "devices")
        assert not [e for e in none.events if e.event == "devices"]
        assert none.events and none.events[0].event == "ping" and not none.ended
    status, body = dash.get_json("/api/live?devices=" + ",".join(f"d{i}" for i in range(1001)))
    assert status == 400 and body["error"]["param"] == "devices"


def test_a_quiet_stream_gets_a_ping_every_ping_s(dash: DashboardServer) -> None:
    ping_s = dash.hub.ping_s
    dash.hub.ping_s = 0.2  # 15 s in service
    try:
        with dash.sse("/api/live?devices=") as quiet:  # no rows: nothing else to send
            assert quiet.wait(lambda e: e.event == "ping", 5)  # at connect
            later = quiet.wait(lambda e: e.event == "ping", 5, start=1)
            assert later is not None and later.data == {}
            assert quiet.wait(lambda e: e.event == "ping", 5, start=2)
            assert all(e.event == "ping" for e in quiet.events)
    finally:
        dash.hub.ping_s = ping_s
