"""The fleet suite's core on a clustered broker: a real 3-node NATS cluster (MQTT 3.1.1).

Simulated devices connect to node 1; the console (FleetClient, FleetView, the rollout
engine, SQLite record) connects to node 2 only. Devices are listed, a staged rollout
with an ML gate runs with the bundle sent as MQTT chunks through the cluster, a direct
rollback returns every device to its own previous version, and a gate failure (bundle
over HTTP) halts and rolls the canary back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.signing import load_public_key
from fleet.cli import main
from fleet.config import FleetConfig
from fleet.ports import RecordKind
from fleet.rollout.bundle import BundleInfo, inspect_bundle
from fleet.rollout.control import rollback_devices
from fleet.rollout.engine import RolloutEngine, resolve_targets
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.sources import SourceFactory, console_sources
from fleet.rollout.state import RolloutState
from fleet.simulate import Simulator
from fleet.store import SqlStore, open_store
from tests.fleet._sim import Console, open_console, sample_bundle_v2
from tests.fleet.conftest import write_fleet_toml
from tests.helpers import DEMO_PUB, SampleParts
from tests.nats_cluster import NatsCluster, available

pytestmark = pytest.mark.skipif(not available(), reason="nats-server is not installed")

OPERATOR = "nats-tester"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats")) as c:
        yield c


@pytest.fixture(scope="module")
def console(cluster: NatsCluster, console_key_file: Path) -> Iterator[Console]:
    node = cluster.nodes[1]
    config = FleetConfig.load(
        None,
        broker=f"mqtt://{node.host}:{node.port}",
        protocol="3.1.1",  # NATS has no MQTT 5: replies come back through `reply_to`
        key=str(console_key_file),
        operator=OPERATOR,
        console_id=f"nats-{uuid.uuid4().hex[:6]}",  # no '.': NATS refuses it in topics
        timeout_s=10,
        connect_timeout_s=30,  # JetStream session setup (see test_the_cli_on_node_3)
    )
    with open_console(config) as console:
        yield console


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlStore]:
    s = open_store(str(tmp_path_factory.mktemp("record") / "fleet.db"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def sources(console: Console) -> SourceFactory:
    """The console's own bundle sources: an HTTP server for `via=http`, chunks over
    MQTT through the cluster for `via=mqtt` (fleet/bundle_source.py)."""
    return console_sources(console.client, "127.0.0.1", [load_public_key(DEMO_PUB)])


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, sample_parts: SampleParts, demo_key: Any
) -> BundleInfo:
    path = sample_bundle_v2(tmp_path_factory.mktemp("bundle"), sample_parts, demo_key)
    return inspect_bundle(path, [DEMO_PUB])


ROLL, GATE = "roll", "gate"  # the two groups: a rollout + rollback, a gate failure


@pytest.fixture(scope="module")
def sim(cluster: NatsCluster, console_pub: Path, console: Console) -> Iterator[Simulator]:
    """9 simulated devices on node 1 (5 in group `roll`, 4 in `gate`), all in the view of
    the console on node 2. One simulator for the module: on NATS every QoS 1
    subscription is a JetStream consumer, so devices are costly to start."""
    node = cluster.nodes[0]
    groups = {ROLL: list(range(5)), GATE: list(range(5, 9))}
    with Simulator(node.host, node.port, 9, prefix="nats", groups=groups,
                   console_keys=[console_pub], protocol="3.1.1", telemetry_interval_s=0.2,
                   latency=0.02, model=("digits", "1.0.0"), start_timeout_s=180) as s:  # fmt: skip
        ids = set(s.device_ids)
        assert console.view.wait(
            lambda v: all(
                (r := v.row(d)) is not None and r.online and r.model_version and r.live for d in ids
            ),
            120,
        ), "the simulated devices on node 1 did not all show up in the view on node 2"
        yield s


def _members(sim: Simulator, group: str) -> list[str]:
    return sorted(d for d in sim.device_ids if group in sim.devices[d].groups)


def _engine(store: SqlStore, console: Console, sources: SourceFactory) -> RolloutEngine:
    return RolloutEngine(store, console.view, console.client, operator=OPERATOR,
                         sources=sources, tick_s=0.05, lease_ttl_s=5.0,
                         command_timeout_s=10.0)  # fmt: skip


def _plan(group: str, **kw: Any) -> RolloutPlan:
    options: dict[str, Any] = {
        "targets": (f"group:{group}",),
        "canary": 1, "wave": "2", "soak_s": 0.3, "device_timeout_s": 60.0,
        "gates": "p95_ms<=1.2x,error_rate<=0.01",
    }  # fmt: skip
    options.update(kw)
    return RolloutPlan(**options)


def _run(store: SqlStore, console: Console, sources: SourceFactory, p: RolloutPlan,
         b: BundleInfo) -> RolloutState:  # fmt: skip
    e = _engine(store, console, sources)
    return e.drive(e.create(p, b).rollout_id)


def _served(sim: Simulator, device: str) -> str:
    return str(sim.state(device)["model"]["version"])


def test_devices_on_node_1_are_listed_through_node_2(console: Console, sim: Simulator) -> None:
    ids = _members(sim, ROLL)
    rows = {r.device_id: r for r in console.view.rows(group=ROLL)}
    assert sorted(rows) == ids and len(ids) == 5
    for row in rows.values():
        assert row.online and row.model_version == "1.0.0" and row.health == "ready"
        assert row.groups == (ROLL,)
        assert row.p95_ms is not None and row.telemetry_ts is not None
    assert resolve_targets(console.view, [f"group:{ROLL}"]) == ids
    assert len(console.view.rows()) >= 9
    # A command through the cluster: sent on node 2, answered by a device on node 1.
    reply = console.client.request(ids[0], "config.get", {"keys": ["telemetry.interval_s"]})
    assert reply.ok and reply.device_id == ids[0], reply


def test_the_cli_on_node_3(
    cluster: NatsCluster, sim: Simulator, console_key_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    node = cluster.nodes[2]
    config = write_fleet_toml(tmp_path / "fleet.toml", {
        "broker": f"mqtt://{node.host}:{node.port}", "protocol": "3.1.1",
        "key": console_key_file, "operator": OPERATOR, "db": tmp_path / "fleet.db",
        "console_id": f"cli-{uuid.uuid4().hex[:6]}", "timeout_s": 10,
        # A NATS CONNECT sets up (or clears) the session in JetStream: seconds on a
        # busy machine, more than the 5 s default leaves for the reply topic's SUBACK.
        "connect_timeout_s": 30,
    })  # fmt: skip

    def cli(*argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        code = main(["--config", str(config), "--json", *argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, json.loads(out)

    ids = _members(sim, ROLL)
    code, rows = cli("devices", "--group", ROLL)
    assert code == 0 and [r["device_id"] for r in rows] == ids
    assert all(r["online"] is True and r["groups"] == [ROLL] for r in rows), rows
    code, out = cli("ping", f"group:{ROLL}")
    assert code == 0, out["error"]["message"] if "error" in out else out


def test_a_rollout_then_a_rollback_through_the_cluster(
    store: SqlStore, console: Console, sim: Simulator, bundle: BundleInfo, sources: SourceFactory
) -> None:
    ids = _members(sim, ROLL)
    # The bundle travels as MQTT chunks through the cluster (transfer ids without '.').
    state = _run(store, console, sources, _plan(ROLL, via="mqtt"), bundle)
    assert state.finished == "succeeded", {
        d: (s.status, s.outcome, s.code, s.message) for d, s in state.devices.items()
    }
    assert [len(w) for w in state.waves] == [1, 2, 2]
    assert all(_served(sim, d) == "2.0.0" for d in ids)
    gates = store.records(rollout_id=state.rollout_id, kinds=[RecordKind.GATE_RESULT])
    assert len(gates) == 10 and all(g.result == "passed" for g in gates)
    # The console sees what the devices report: the new model, the old one as their
    # last-known-good, each from its own retained state.
    assert console.view.wait(
        lambda v: all(
            (r := v.row(d)) is not None and r.model_version == "2.0.0"
            and r.previous_version == "1.0.0" for d in ids
        ),
        30,
    )  # fmt: skip
    results = rollback_devices(
        console.client, console.view, store, ids, version=None,
        who=(console.client.key_id, OPERATOR), timeout_s=60,
    )  # fmt: skip
    assert sorted(r.device_id for r in results) == ids
    assert all(r.ok for r in results), [r.to_json() for r in results if not r.ok]
    assert all(_served(sim, d) == "1.0.0" for d in ids)
    assert console.view.wait(
        lambda v: all((r := v.row(d)) is not None and r.model_version == "1.0.0" for d in ids),
        30,
    )


def test_a_canary_that_breaks_the_gate_halts_and_is_rolled_back(
    store: SqlStore, console: Console, sim: Simulator, bundle: BundleInfo, sources: SourceFactory
) -> None:
    ids = _members(sim, GATE)
    canary = ids[0]
    sim.set_profile("2.0.0", p95_factor=1.5, devices=[canary])
    state = _run(store, console, sources, _plan(GATE), bundle)
    assert state.finished == "halted" and state.halted is not None
    assert state.halted["cause"] == "gate"
    assert [d["device_id"] for d in state.halted["details"]] == [canary]
    assert state.devices[canary].status == "rolled_back"
    assert state.devices[canary].rolled_back_to == "1.0.0"
    assert _served(sim, canary) == "1.0.0"
    for dev in ids[1:]:  # never touched
        assert sim.state(dev)["update"] is None and _served(sim, dev) == "1.0.0"
