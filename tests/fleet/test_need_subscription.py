"""The console owns the SUBACK of each MQTT transfer's "need" subscription.

A broker that refuses it (here a real mosquitto whose dynamic-security plugin denies
the console subscribing to edgerun/v1/+/bundle/+/need) fails that device at once,
its deploy never sent, instead of a device timeout a minute later; and a transfer
subscribed through the FleetClient survives the console's reconnect (a broker
restart forgets every subscription).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.topics import DeviceTopics
from agent.protocol.transfer import Need, decode_chunk
from agent.signing import load_public_key
from fleet.bundle_source import SUBSCRIBE_BACKOFF_S, MqttBundleSource
from fleet.config import FleetConfig
from fleet.errors import FleetCode, FleetError
from fleet.mqtt import FleetClient
from fleet.ports import RecordKind
from fleet.rollout.bundle import BundleInfo, inspect_bundle
from fleet.rollout.engine import RolloutEngine
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.sources import console_sources
from fleet.simulate import Simulator
from fleet.store import SqlStore, open_store
from tests.fleet._sim import Console, open_console, quick_sim, sample_bundle_v2
from tests.helpers import DEMO_PUB, SampleParts
from tests.mqtt_broker import Broker, Listener, deny_subscribe, dynsec_plugin

OPERATOR = "need-tester"
NEED_FILTER = "edgerun/v1/+/bundle/+/need"
TRUST = [load_public_key(DEMO_PUB)]


def config_for(broker: Broker, console_key_file: Path, **keys: Any) -> FleetConfig:
    options: dict[str, Any] = {
        "broker": f"mqtt://{broker.host}:{broker.port}",
        "key": str(console_key_file),
        "operator": OPERATOR,
        "console_id": f"need-{uuid.uuid4().hex[:6]}",
        "timeout_s": 5,
    }
    options.update(keys)
    return FleetConfig.load(None, **options)


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, sample_parts: SampleParts, demo_key: Any
) -> BundleInfo:
    path = sample_bundle_v2(tmp_path_factory.mktemp("bundle"), sample_parts, demo_key)
    return inspect_bundle(path, TRUST)


@pytest.fixture(scope="module")
def denying_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if dynsec_plugin() is None:
        pytest.skip("mosquitto's dynamic security plugin is not installed")
    with Broker(tmp_path_factory.mktemp("deny"), dynsec=deny_subscribe([NEED_FILTER])) as b:
        yield b


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_refused_need_subscription_fails_the_canary_at_once_and_halts(
    denying_broker: Broker,
    console_key_file: Path,
    console_pub: Path,
    bundle: BundleInfo,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="fleet")
    config = config_for(denying_broker, console_key_file, protocol=protocol)
    group, options = quick_sim(console_pub, "n")
    with (
        open_console(config) as console,
        Simulator(denying_broker.host, denying_broker.port, 3, **options) as sim,
    ):
        ids = sorted(sim.device_ids)
        assert console.view.wait(
            lambda v: all((r := v.row(d)) is not None and r.online and r.live for d in ids), 30
        ), "simulated devices did not all show up in the view"
        store: SqlStore = open_store(str(tmp_path / "fleet.db"))
        try:
            state = drive(store, console, RolloutPlan(
                targets=(f"group:{group}",), canary=1, wave="50%", soak_s=0.3,
                device_timeout_s=60.0, via="mqtt",
            ), bundle)  # fmt: skip
            canary = state.devices[ids[0]]
            assert canary.outcome == "failed", canary
            assert canary.code == FleetCode.BROKER.value == "console.broker_unreachable"
            assert "refused the subscription" in canary.message
            assert f"edgerun/v1/{ids[0]}/bundle/" in canary.message
            assert "ACL for the console user" in canary.message
            assert canary.message.startswith("deploy not sent: ")
            assert state.finished == "halted"
            assert state.halted is not None and state.halted["cause"] == "success_threshold"
            # The record shows why, and nothing was sent to any device: no job started,
            # nothing to roll back.
            outcomes = store.records(rollout_id=state.rollout_id,
                                     kinds=[RecordKind.DEVICE_OUTCOME])  # fmt: skip
            assert [r.device_id for r in outcomes] == [ids[0]]
            assert "refused the subscription" in outcomes[0].data["message"]
            assert not store.records(
                rollout_id=state.rollout_id,
                kinds=[RecordKind.DEVICE_STARTED, RecordKind.DEVICE_ROLLED_BACK],
            )
            assert canary.job is None and not canary.rollback_done
            for d in ids:
                assert sim.state(d)["update"] is None
                assert sim.state(d)["model"]["version"] == "1.0.0"
            for d in ids[1:]:
                assert state.devices[d].status == "pending"
        finally:
            store.close()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    retries = [r for r in caplog.records if "need subscription for" in r.getMessage()]
    # One retry logged a pause, each with the broker's reason.
    assert len(retries) == len(SUBSCRIBE_BACKOFF_S) == 2


def drive(store: SqlStore, console: Console, plan: RolloutPlan, b: BundleInfo) -> Any:
    e = RolloutEngine(
        store,
        console.view,
        console.client,
        operator=OPERATOR,
        sources=console_sources(console.client, "127.0.0.1", TRUST),
        tick_s=0.05,
        lease_ttl_s=5.0,
        command_timeout_s=5.0,
    )
    return e.drive(e.create(plan, b).rollout_id)


def test_the_bundle_source_refuses_a_transfer_the_broker_will_not_serve(
    denying_broker: Broker, console_key_file: Path, bundle: BundleInfo
) -> None:
    client = FleetClient(config_for(denying_broker, console_key_file)).connect()
    try:
        with MqttBundleSource(client.paho, bundle.path, trust=TRUST,
                              subscriber=client) as source:  # fmt: skip
            with pytest.raises(FleetError) as info:
                source.transfer_for("dev-x")
            assert info.value.code is FleetCode.BROKER
            assert "edgerun/v1/dev-x/bundle/" in info.value.message
            assert "refused" in info.value.message
            # Forgotten: a second ask tries again, it does not hand out the id of a
            # transfer no one serves.
            with pytest.raises(FleetError):
                source.transfer_for("dev-x")
    finally:
        client.close()


def test_a_transfer_survives_the_consoles_reconnect(
    tmp_path: Path, console_key_file: Path, bundle: BundleInfo
) -> None:
    device = f"dev-{uuid.uuid4().hex[:6]}"
    with Broker(tmp_path) as broker:
        client = FleetClient(config_for(broker, console_key_file)).connect()
        try:
            with MqttBundleSource(client.paho, bundle.path, trust=TRUST,
                                  subscriber=client) as source:  # fmt: skip
                tid = source.transfer_for(device)
                # A crash and restart on the same port: every session and subscription
                # is gone; the console reconnects by itself.
                broker.kill()
                broker.start()
                deadline = time.monotonic() + 30
                while not (client.connections >= 2 and client.connected):
                    assert time.monotonic() < deadline, "the console did not reconnect"
                    time.sleep(0.05)
                topics = DeviceTopics(device)
                chunks = Listener(broker, [str(topics.bundle(tid))])
                try:
                    need = Need(tid, bundle.sha256, bundle.size, None, (), "start").encode()
                    chunks.client.publish(str(topics.need(tid)), need, qos=1)
                    assert chunks.wait_for(lambda lst: bundle_of(lst) is not None, 20), (
                        "no complete bundle after the reconnect"
                    )
                    data = bundle_of(chunks)
                    assert data is not None
                    assert hashlib.sha256(data).hexdigest() == bundle.sha256
                finally:
                    chunks.close()
        finally:
            client.close()


def bundle_of(listener: Listener) -> bytes | None:
    """The bundle when every chunk arrived, else None."""
    got: dict[int, bytes] = {}
    total = None
    for _, payload, _, _ in list(listener.messages):
        chunk = decode_chunk(payload)
        got[chunk.index] = chunk.payload
        total = chunk.total
    if total is None or len(got) < total:
        return None
    return b"".join(got[i] for i in range(total))
