"""FleetView: rows from real agents (retained status/state, telemetry), the last will,
repeats dropped by seq, a malformed device that breaks nothing, update phases, and
thousands of retained messages settled by start()."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.messages import dumps
from agent.protocol.topics import DeviceTopics
from fleet.config import FleetConfig
from fleet.mqtt import FleetClient, Message
from fleet.view import FleetView
from tests.fleet._agents import agents
from tests.helpers import AgentProcess
from tests.mqtt_broker import Broker

DEVICES = ["vw-a", "vw-b", "vw-c"]


def connect(broker: Broker, key: Ed25519PrivateKey | None = None, **keys: Any) -> FleetClient:
    config = FleetConfig.load(None, broker=f"mqtt://{broker.host}:{broker.port}", **keys)
    return FleetClient(config, key=key).connect()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, broker: Broker, console_pub: Path
) -> Iterator[dict[str, AgentProcess]]:
    directory = tmp_path_factory.mktemp("agents")
    with agents(
        directory, broker, DEVICES, console_pub, telemetry_s=0.2, groups=["line-1"]
    ) as procs:
        yield procs


@pytest.fixture(scope="module")
def publisher(broker: Broker) -> Iterator[FleetClient]:
    """Publishes what a (broken or scripted) device would, on the same broker."""
    with connect(broker) as c:
        yield c


def test_rows_from_real_agents(fleet: dict[str, AgentProcess], broker: Broker) -> None:
    with connect(broker) as client:
        view = FleetView(client).start()
        assert view.settled
        assert view.wait(
            lambda v: all((r := v.row(d)) and r.online and r.telemetry_ts for d in DEVICES), 60
        )
        rows = view.rows()
        assert [r.device_id for r in rows if r.device_id in DEVICES] == DEVICES
        for row in rows:
            if row.device_id not in DEVICES:
                continue
            assert row.agent_version and row.model_name == "digits"
            assert row.model_version == "1.0.0" and row.model_sha256
            assert row.health == "ready" and row.reason == "connected"
            assert row.rss_mb is not None and row.rss_mb > 10
            assert row.outbox_messages is not None and row.rate_per_s is not None
            assert row.since is not None and row.seen_at is not None
            assert row.groups == ("line-1",) and row.previous_version is None
            # The sample has no `variants`: its ONNX model serves by model.preference.
            assert row.variant == "onnx" and "no variants" in (row.variant_reason or "")
        assert [r.device_id for r in view.rows(group="line-1")] == DEVICES
        assert view.rows(group="line-2") == []


def test_listeners_see_every_stream_and_can_be_removed(
    fleet: dict[str, AgentProcess], broker: Broker
) -> None:
    with connect(broker) as client:
        view = FleetView(client)
        seen: list[tuple[str, str]] = []
        remove = view.add_listener(lambda kind, device, msg: seen.append((kind, device)))
        view.start()
        assert view.wait(lambda v: ("telemetry", "vw-a") in seen, 30)
        assert ("status", "vw-a") in seen and ("state", "vw-a") in seen
        remove()
        count = len(seen)
        assert view.wait(lambda v: (v.row("vw-b").telemetry_ts or 0) > 0, 5)  # type: ignore[union-attr]
        before = view.row("vw-b").telemetry_ts  # type: ignore[union-attr]
        assert view.wait(lambda v: v.row("vw-b").telemetry_ts != before, 30)  # type: ignore[union-attr]
        assert len(seen) == count


def test_repeats_and_a_malformed_device(
    fleet: dict[str, AgentProcess], broker: Broker, publisher: FleetClient
) -> None:
    captured: list[Message] = []
    publisher.subscribe(str(DeviceTopics("vw-c").telemetry), captured.append, qos=1)
    with connect(broker) as client:
        view = FleetView(client).start()
        # (seq 1 would read as a device whose counter started again: take a later one)
        later = lambda: [m for m in captured if json.loads(m.payload)["seq"] > 1]  # noqa: E731
        assert view.wait(lambda v: bool(later()), 30)
        # A real telemetry message delivered again (at least once): dropped by its seq.
        old = later()[0]
        repeats = view.repeats
        publisher.publish(old.topic, old.payload)
        assert view.wait(lambda v: v.repeats > repeats, 10)
        # Another device sends garbage on every stream: counted, the view goes on.
        bad = DeviceTopics("vw-bad")
        for topic, payload in [
            (bad.status, b"not json"),
            (bad.state, b'{"health": 1, "model": []}'),
            (bad.telemetry, b'{"seq": "x"}'),
            (bad.events, b'{"seq": 1, "kind": 5}'),
            (bad.telemetry, json.dumps({"seq": 1, "system": {"rss_mb": 1e999}}).encode()),
        ]:
            publisher.publish(topic, payload)
        assert view.wait(lambda v: v.malformed >= 4, 10)
        # ...and keeps updating the good devices.
        last = view.row("vw-c").telemetry_ts  # type: ignore[union-attr]
        assert view.wait(lambda v: v.row("vw-c").telemetry_ts != last, 30)  # type: ignore[union-attr]
        assert view.row("vw-bad") is None or view.row("vw-bad").online is None  # type: ignore[union-attr]


def test_update_phases_never_go_back(broker: Broker, publisher: FleetClient) -> None:
    topics = DeviceTopics("vw-upd")

    def event(seq: int, kind: str, job: str) -> None:
        body = {"device_id": "vw-upd", "seq": seq, "ts": 1.0, "kind": kind, "reason": "",
                "data": {"job": job, "version": "2.0.0"}}  # fmt: skip
        publisher.publish(topics.events, dumps(body))

    def state(job: str, phase: str) -> None:
        body = {"device_id": "vw-upd", "agent_version": "0.1.0",
                "model": {"name": "digits", "version": "2.0.0", "sha256": "ab"},
                "health": {"ready": True, "overloaded": False},
                "update": {"job": job, "kind": "deploy", "phase": phase, "version": "2.0.0"}}  # fmt: skip
        publisher.publish(topics.state, dumps(body), retain=True)

    with connect(broker) as client:
        view = FleetView(client)
        seqs: list[int] = []
        view.add_listener(lambda kind, device, msg: kind == "event" and seqs.append(msg.seq))
        view.start()
        event(1, "update.downloading", "j1")
        assert view.wait(
            lambda v: (r := v.row("vw-upd")) is not None and r.phase == "downloading", 10
        )
        state("j1", "committed")
        assert view.wait(lambda v: v.row("vw-upd").phase == "committed", 10)  # type: ignore[union-attr]
        # A late trial event of the same job (events queue in the outbox): stale.
        event(2, "update.trial", "j1")
        event(3, "model.loaded", "j1")
        assert view.wait(lambda v: 3 in seqs, 10)
        row = view.row("vw-upd")
        assert row is not None and row.phase == "committed" and row.job == "j1"
        assert row.model_version == "2.0.0" and row.health == "ready"
        # The next job moves on; a repeated event (same seq) changes nothing.
        event(4, "update.accepted", "j2")
        assert view.wait(lambda v: v.row("vw-upd").job == "j2", 10)  # type: ignore[union-attr]
        repeats = view.repeats
        event(4, "update.committed", "j2")
        assert view.wait(lambda v: v.repeats > repeats, 10)
        assert view.row("vw-upd").phase == "accepted"  # type: ignore[union-attr]
        event(5, "update.verifying", "j2")
        assert view.wait(lambda v: v.row("vw-upd").phase == "verifying", 10)  # type: ignore[union-attr]


def test_the_last_will_and_a_forgotten_device(
    fleet: dict[str, AgentProcess], broker: Broker, publisher: FleetClient
) -> None:
    with connect(broker) as client:
        view = FleetView(client).start()
        assert view.row("vw-a") is not None and view.row("vw-a").online  # type: ignore[union-attr]
        fleet["vw-a"].proc.kill()
        fleet["vw-a"].proc.wait()
        assert view.wait(lambda v: v.row("vw-a").online is False, 60)  # type: ignore[union-attr]
        row = view.row("vw-a")
        assert row is not None and row.reason == "connection lost (last will)"
        assert row.since is not None and row.since >= (row.telemetry_ts or 0) - 1
        # Its retained status, state and telemetry cleared (decommissioned): the row goes.
        publisher.publish(DeviceTopics("vw-a").status, b"", retain=True)
        publisher.publish(DeviceTopics("vw-a").state, b"", retain=True)
        publisher.publish(DeviceTopics("vw-a").telemetry, b"", retain=True)
        assert view.wait(lambda v: v.row("vw-a") is None, 10)
    with connect(broker) as client:  # and a new console never sees it
        view = FleetView(client).start()
        assert view.row("vw-a") is None and view.row("vw-b") is not None


def test_start_settles_thousands_of_retained_devices(tmp_path: Path) -> None:
    """On a mosquitto with its default queue (20 in flight, 1,000 queued a client): at
    QoS 1 it dropped the retained messages of all but ~1,000 devices."""
    n = 2000
    own = Broker(tmp_path)
    own.config.write_text(own.config.read_text().replace("max_queued_messages 100000\n", ""))
    assert "max_queued_messages" not in own.config.read_text()
    with own, connect(own) as pub:
        for i in range(n):
            topics = DeviceTopics(f"many-{i:05d}")
            status = {"device_id": topics.device, "state": "online", "agent_version": "0.1.0",
                      "since": 1.0 + i, "reason": "connected"}  # fmt: skip
            state = {"device_id": topics.device, "agent_version": "0.1.0",
                     "model": {"name": "m", "version": "1.0.0", "sha256": "00"},
                     "groups": ["even" if i % 2 == 0 else "odd"],
                     "health": {"ready": True, "overloaded": False}}  # fmt: skip
            pub.publish(topics.status, dumps(status), retain=True, wait=False)
            pub.publish(topics.state, dumps(state), retain=True, wait=i == n - 1)
        with connect(own) as client:
            view = FleetView(client).start(settle_s=60)
            # No waiting beyond start(): the marker came back behind every retained message.
            assert view.settled and len(view) == n
            assert all(r.online and r.model_version == "1.0.0" for r in view.rows())
            assert len(view.rows(group="even")) == n // 2


def test_shared_group_workers_split_the_telemetry(broker: Broker, publisher: FleetClient) -> None:
    """Two console workers with shared_group: each telemetry report reaches one of them
    ($share/<group>/...), while status and state reach both."""
    n = 200
    with connect(broker, shared_group="w1") as a, connect(broker, shared_group="w1") as b:
        views = [FleetView(a).start(), FleetView(b).start()]
        for i in range(n):
            topics = DeviceTopics(f"shr-{i:03d}")
            body = {"device_id": topics.device, "seq": 1, "ts": 5.0, "interval_s": 1.0,
                    "inference": {}, "system": {"rss_mb": 10.0}, "model": None,
                    "outbox": {"messages": 0}}  # fmt: skip
            publisher.publish(topics.telemetry, dumps(body), wait=False)
        publisher.publish(DeviceTopics("shr-000").status, dumps(
            {"device_id": "shr-000", "state": "online", "agent_version": "0.1.0", "since": 1.0}
        ))  # fmt: skip

        def seen(v: FleetView) -> set[str]:
            return {r.device_id for r in v.rows() if r.device_id.startswith("shr-") and r.rss_mb}

        assert views[0].wait(lambda _: len(seen(views[0]) | seen(views[1])) == n, 30)
        assert seen(views[0]) and seen(views[1])  # both took a share
        assert not seen(views[0]) & seen(views[1])  # and no report went to both
        for v in views:
            assert v.wait(lambda v: (r := v.row("shr-000")) is not None and bool(r.online), 10)
