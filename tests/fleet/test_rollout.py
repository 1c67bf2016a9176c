"""Staged rollouts end to end: a real mosquitto, simulated devices speaking the agent's
protocol (fleet/simulate/), the console's real FleetClient/FleetView, and the record on
a real SQLite file and on the machine's PostgreSQL (the core is parametrized over both).

Each test takes its own devices (a prefix and group of its own): the broker and its
retained messages are shared by the module, the targets never overlap.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.update import DeployRequest
from agent.signing import load_public_key
from fleet.config import FleetConfig
from fleet.ports import NewRecord, RecordKind
from fleet.rollout.bundle import BundleInfo, inspect_bundle
from fleet.rollout.control import request
from fleet.rollout.engine import RolloutEngine
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.sources import SourceFactory, console_sources
from fleet.rollout.state import RolloutState
from fleet.simulate import Simulator
from fleet.store import SqlStore, open_store
from tests.fleet._sim import Console, open_console, quick_sim, sample_bundle_v2
from tests.helpers import DEMO_PUB, SampleParts
from tests.mqtt_broker import Broker
from tests.pg import pg_database_fixture

pg_db = pg_database_fixture()
OPERATOR = "rollout-tester"
GATES = "p95_ms<=1.2x,error_rate<=0.01"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlStore]:
    if request.param == "sqlite":
        url = str(tmp_path_factory.mktemp("record") / "fleet.db")
    else:
        url = str(request.getfixturevalue("pg_db"))
    s = open_store(url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def sqlite_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("record-sqlite") / "fleet.db")


@pytest.fixture(scope="module")
def sqlite_store(sqlite_path: str) -> Iterator[SqlStore]:
    s = open_store(sqlite_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def console(broker: Broker, console_key_file: Path) -> Iterator[Console]:
    config = FleetConfig.load(
        None,
        broker=f"mqtt://{broker.host}:{broker.port}",
        key=str(console_key_file),
        operator=OPERATOR,
        console_id=f"rollout-{uuid.uuid4().hex[:6]}",
        timeout_s=5,
    )
    with open_console(config) as console:
        yield console


@pytest.fixture(scope="module")
def http_sources(console: Console) -> SourceFactory:
    """The console's own bundle sources (fleet.bundle_source): an HTTP server for the
    bundle, or chunks over MQTT; the devices download it for real and check its sha256."""
    return console_sources(console.client, "127.0.0.1", [load_public_key(DEMO_PUB)])


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, sample_parts: SampleParts, demo_key: Any
) -> BundleInfo:
    """A real signed bundle of the sample model, version 2.0.0, verified as deploy does."""
    path = sample_bundle_v2(tmp_path_factory.mktemp("bundle"), sample_parts, demo_key)
    return inspect_bundle(path, [load_public_key(DEMO_PUB)])


Sims = Callable[..., Simulator]


@pytest.fixture
def sims(broker: Broker, console_pub: Path, console: Console) -> Iterator[Sims]:
    """sims(n, **knobs) -> a started Simulator whose devices are all in the view, in a
    group of their own (`sim.group`)."""
    started: list[Simulator] = []

    def make(n: int, **kw: Any) -> Simulator:
        group, options = quick_sim(console_pub, "s")
        options.update(kw)
        sim = Simulator(broker.host, broker.port, n, **options)
        sim.__enter__()
        started.append(sim)
        sim.group = group  # type: ignore[attr-defined]
        ids = set(sim.device_ids)
        # Every device seen online with its state and live figures (baselines need them).
        assert console.view.wait(
            lambda v: all(
                (r := v.row(d)) is not None and r.online and r.model_version and r.live for d in ids
            ),
            30,
        ), "simulated devices did not all show up in the view"
        return sim

    yield make
    for sim in started:
        sim.close()


def engine(store: SqlStore, console: Console, sources: SourceFactory, **kw: Any) -> RolloutEngine:
    options: dict[str, Any] = {
        "operator": OPERATOR,
        "sources": sources,
        "tick_s": 0.05,
        "lease_ttl_s": 5.0,
        "command_timeout_s": 5.0,
    }
    options.update(kw)
    return RolloutEngine(store, console.view, console.client, **options)


def plan(sim: Simulator, **kw: Any) -> RolloutPlan:
    options: dict[str, Any] = {
        "targets": (f"group:{sim.group}",),  # type: ignore[attr-defined]
        "canary": 2,
        "wave": "25%",
        "soak_s": 0.3,
        "device_timeout_s": 10.0,
        "gates": GATES,
    }
    options.update(kw)
    return RolloutPlan(**options)


def served(sim: Simulator, device: str) -> str:
    model = sim.state(device)["model"]
    return str(model["version"])


def kinds(store: SqlStore, rollout_id: str, kind: RecordKind) -> list[Any]:
    return store.records(rollout_id=rollout_id, kinds=[kind])


def run(
    store: SqlStore, console: Console, sources: SourceFactory, p: RolloutPlan, b: BundleInfo
) -> RolloutState:
    e = engine(store, console, sources)
    created = e.create(p, b)
    return e.drive(created.rollout_id)


# --------------------------------------------------------------------------- core


def test_fifty_devices_all_pass(
    store: SqlStore, console: Console, sims: Sims, bundle: BundleInfo, http_sources: SourceFactory
) -> None:
    sim = sims(50)
    state = run(store, console, http_sources, plan(sim), bundle)
    assert state.finished == "succeeded", state.summary()
    assert [len(w) for w in state.waves] == [2, 13, 13, 13, 9]
    assert state.counts() == {"succeeded": 50}
    assert all(served(sim, d) == "2.0.0" for d in sim.device_ids)
    gates = kinds(store, state.rollout_id, RecordKind.GATE_RESULT)
    assert len(gates) == 100 and all(g.result == "passed" for g in gates)
    # The gate compared each device with its own figure before the update.
    g = next(r for r in gates if r.data["metric"] == "p95_ms")
    baseline = state.baselines[str(g.device_id)]["p95_ms"]
    assert g.data["baseline"] == baseline and g.data["limit"] == pytest.approx(1.2 * baseline)
    waves = kinds(store, state.rollout_id, RecordKind.WAVE_FINISHED)
    assert [w.data["succeeded"] for w in waves] == [2, 13, 13, 13, 9]
    # Who: every record names the console's key and the operator.
    records = store.records(rollout_id=state.rollout_id)
    assert {(r.key_id, r.operator) for r in records} == {(console.client.key_id, OPERATOR)}
    # Canary first: no device of wave 1 started before the canary's gates were recorded.
    seqs = {r.kind: r.seq for r in reversed(records)}  # first seq of each kind
    first_wave1 = next(
        r.seq for r in records if r.kind is RecordKind.WAVE_STARTED and r.data["wave"] == 1
    )
    assert seqs[RecordKind.GATE_RESULT] < first_wave1


def test_two_canaries_break_the_latency_gate(
    store: SqlStore, console: Console, sims: Sims, bundle: BundleInfo, http_sources: SourceFactory
) -> None:
    sim = sims(20)
    canaries = sorted(sim.device_ids)[:2]
    # 1.5x slower on those two only: under the device's own trial bound (2x), so the
    # devices commit it; the console's gate (1.2x of each device's own p95) catches it.
    sim.set_profile("2.0.0", p95_factor=1.5, devices=canaries)
    state = run(store, console, http_sources, plan(sim), bundle)
    assert state.finished == "halted"
    assert state.halted is not None and state.halted["cause"] == "gate"
    failed = {d["device_id"]: d for d in state.halted["details"]}
    assert set(failed) == set(canaries)
    for dev in canaries:
        detail = failed[dev]
        assert detail["gate"] == "p95_ms<=1.2x" and not detail["passed"]
        assert detail["figure"] > detail["limit"] == pytest.approx(1.2 * detail["baseline"])
        assert state.devices[dev].status == "rolled_back"
        assert state.devices[dev].rolled_back_to == "1.0.0"
        assert served(sim, dev) == "1.0.0"  # back on its own previous version
    assert "p95_ms<=1.2x" in state.reason and canaries[0] in state.reason
    # The rest were never touched: no deploy reached them, nothing recorded for them.
    rest = sorted(set(sim.device_ids) - set(canaries))
    started = {r.device_id for r in kinds(store, state.rollout_id, RecordKind.DEVICE_STARTED)}
    assert started == set(canaries)
    for dev in rest:
        assert sim.state(dev)["update"] is None, dev  # the device never saw a job
        assert served(sim, dev) == "1.0.0"
        assert state.devices[dev].status == "pending"
    assert state.waves_started == 1


def test_a_device_that_hangs_times_out_and_halts_the_wave(
    store: SqlStore, console: Console, sims: Sims, bundle: BundleInfo, http_sources: SourceFactory
) -> None:
    sim = sims(6)
    ids = sorted(sim.device_ids)
    hung = ids[3]  # in wave 1 (canary 2, then waves of 2)
    sim.set_knobs([hung], hang_rate=1.0, hang_phase="downloading")
    state = run(store, console, http_sources, plan(sim, wave="2", device_timeout_s=3.0), bundle)
    assert state.finished == "halted"
    dev = state.devices[hung]
    assert dev.outcome == "timed_out" and dev.code == "update.device_timeout"
    assert "downloading" in dev.message
    assert state.halted is not None and state.halted["cause"] == "success_threshold"
    # Those it updated are back on 1.0.0; the hung one never swapped: nothing to undo,
    # and its job was cancelled.
    for d in ids[:3]:
        assert state.devices[d].status == "rolled_back" and served(sim, d) == "1.0.0"
    assert served(sim, hung) == "1.0.0"
    assert state.devices[hung].rollback_done and state.devices[hung].rolled_back_to is None
    assert console.view.wait(
        lambda v: (r := v.row(hung)) is not None and r.phase == "cancelled", 10
    )
    assert all(sim.state(d)["update"] is None for d in ids[4:])


def test_abort_threshold_waits_for_its_minimum_of_finished_devices(
    store: SqlStore, console: Console, sims: Sims, bundle: BundleInfo, http_sources: SourceFactory
) -> None:
    sim = sims(10)
    ids = sorted(sim.device_ids)
    sim.set_knobs(ids[2:4], fail_rate=1.0)  # validation fails on two devices of wave 1
    # No per-wave threshold (0%): only the abort threshold can stop it.
    p = plan(
        sim,
        canary=1,
        wave="3",
        success_threshold=0,
        abort_threshold=25,
        abort_min_finished=4,
        gates="",
    )
    state = run(store, console, http_sources, p, bundle)
    assert state.finished == "halted"
    assert state.halted is not None and state.halted["cause"] == "abort_threshold"
    assert "2 of 4 finished devices failed (50%)" in state.reason
    assert {d["device_id"] for d in state.halted["details"]} == set(ids[2:4])
    assert all(state.devices[d].code == "update.validation_failed" for d in ids[2:4])
    assert all(sim.state(d)["update"] is None for d in ids[4:])  # later waves never started

    # The same failures under a minimum no rollout of 10 reaches: it carries on.
    sim2 = sims(10)
    ids2 = sorted(sim2.device_ids)
    sim2.set_knobs(ids2[2:4], fail_rate=1.0)
    p2 = plan(
        sim2,
        canary=1,
        wave="3",
        success_threshold=0,
        abort_threshold=25,
        abort_min_finished=11,
        gates="",
    )
    state2 = run(store, console, http_sources, p2, bundle)
    assert state2.finished == "succeeded"
    assert state2.counts() == {"failed": 2, "succeeded": 8}


def test_a_group_with_an_offline_device(
    store: SqlStore, console: Console, sims: Sims, bundle: BundleInfo, http_sources: SourceFactory
) -> None:
    sim = sims(5)
    ids = sorted(sim.device_ids)
    away = ids[3]
    sim.offline(away)
    assert console.view.wait(lambda v: (r := v.row(away)) is not None and r.online is False, 10)
    state = run(store, console, http_sources, plan(sim, canary=1, wave="2"), bundle)
    # Offline devices are skipped (recorded, listed), never sent anything, and count in
    # neither threshold: the rollout of the reachable ones succeeds.
    assert state.finished == "succeeded"
    assert state.counts() == {"skipped_offline": 1, "succeeded": 4}
    assert "1 skipped offline" in state.reason
    dev = state.devices[away]
    assert dev.outcome == "skipped_offline" and dev.job is None
    assert "offline when its wave started" in dev.message
    sim.online(away)
    assert sim.state(away)["update"] is None and served(sim, away) == "1.0.0"
    waves = kinds(store, state.rollout_id, RecordKind.WAVE_FINISHED)
    assert [(w.data["skipped"], w.data["success_pct"]) for w in waves] == [
        (0, 100.0),
        (0, 100.0),
        (1, 100.0),
    ]


def test_chunks_over_mqtt(
    store: SqlStore, console: Console, sims: Sims, bundle: BundleInfo, http_sources: SourceFactory
) -> None:
    sim = sims(4)
    state = run(store, console, http_sources, plan(sim, canary=1, wave="50%", via="mqtt"), bundle)
    assert state.finished == "succeeded" and state.counts() == {"succeeded": 4}
    assert all(served(sim, d) == "2.0.0" for d in sim.device_ids)
    deploys = [
        r for r in store.records(rollout_id=state.rollout_id) if r.kind is RecordKind.DEVICE_STARTED
    ]
    assert len(deploys) == 4


def test_a_gate_without_enough_data_is_inconclusive_and_fails_unless_allowed(
    sqlite_store: SqlStore,
    console: Console,
    sims: Sims,
    bundle: BundleInfo,
    http_sources: SourceFactory,
) -> None:
    sim = sims(3)
    strict = plan(sim, canary=1, wave="2", gate_min_requests=10**9)  # more than any device has
    e = engine(sqlite_store, console, http_sources, gate_wait_s=0.5)
    state = e.drive(e.create(strict, bundle).rollout_id)
    assert state.finished == "halted" and state.halted is not None
    assert state.halted["cause"] == "gate"
    results = kinds(sqlite_store, state.rollout_id, RecordKind.GATE_RESULT)
    assert {r.result for r in results} == {"inconclusive"}
    assert "fewer than 1000000000; counts as failed" in results[0].data["reason"]
    assert served(sim, sorted(sim.device_ids)[0]) == "1.0.0"  # the canary was rolled back

    sim2 = sims(3)
    allowed = plan(sim2, canary=1, wave="2", gate_min_requests=10**9, allow_no_data=True)
    e2 = engine(sqlite_store, console, http_sources, gate_wait_s=0.5)
    state2 = e2.drive(e2.create(allowed, bundle).rollout_id)
    assert state2.finished == "succeeded"
    results2 = kinds(sqlite_store, state2.rollout_id, RecordKind.GATE_RESULT)
    assert {r.result for r in results2} == {"passed"}
    assert all(r.data["inconclusive"] and "allowed" in r.data["reason"] for r in results2)


def test_a_closed_maintenance_window_holds_devices_until_an_abort(
    sqlite_store: SqlStore,
    sqlite_path: str,
    console: Console,
    sims: Sims,
    bundle: BundleInfo,
    http_sources: SourceFactory,
) -> None:
    sim = sims(2)
    group = sim.group  # type: ignore[attr-defined]
    now_min = int(time.time() // 60) % 1440
    start, end = (now_min + 120) % 1440, (now_min + 180) % 1440
    window = f"{group}={start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    notes: list[str] = []
    e = engine(sqlite_store, console, http_sources, on_note=notes.append)
    created = e.create(plan(sim, canary=1, wave="1", windows=(window,)), bundle)
    rid = created.rollout_id
    result: list[RolloutState] = []
    driver = threading.Thread(target=lambda: result.append(e.drive(rid)), daemon=True)
    driver.start()
    deadline = time.monotonic() + 20
    while not any("maintenance window" in n for n in notes) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any("waits for its group's maintenance window" in n for n in notes), notes
    # Another console (its own connection to the record) aborts it.
    with contextlib.closing(open_store(sqlite_path)) as other:
        request(other, rid, "abort", ("other-key", "dana"), "window too late")
    driver.join(20)
    assert result and result[0].finished == "aborted"
    assert not kinds(sqlite_store, rid, RecordKind.DEVICE_STARTED)
    assert all(sim.state(d)["update"] is None for d in sim.device_ids)
    abort = kinds(sqlite_store, rid, RecordKind.ABORT_REQUESTED)[0]
    assert (abort.key_id, abort.operator, abort.data["reason"]) == (
        "other-key",
        "dana",
        "window too late",
    )


def test_shadow_and_trial_reach_the_devices_and_the_agreement_gate_halts(
    sqlite_store: SqlStore,
    console: Console,
    sims: Sims,
    bundle: BundleInfo,
    http_sources: SourceFactory,
) -> None:
    sim = sims(3)
    ids = sorted(sim.device_ids)
    # The device's own shadow bound (0.95) lets 0.97 through; the console's gate does not.
    sim.set_profile("2.0.0", agreement=0.97, devices=ids[1:2])
    p = plan(sim, canary=1, wave="2", shadow=True, trial_window_s=0.2, gates="agreement>=0.98")
    sent: list[dict[str, Any]] = []
    console.client.on_sent = lambda body, target: sent.append(dict(body))
    try:
        state = run(sqlite_store, console, http_sources, p, bundle)
    finally:
        console.client.on_sent = None
    deploys = [b["args"] for b in sent if b["name"] == "deploy"]
    assert len(deploys) == 3
    assert all(a["trial"] == {"window_s": 0.2} and a["shadow"]["min_agreement"] for a in deploys)
    assert {a["sha256"] for a in deploys} == {bundle.sha256}
    rollbacks = [(b["to"], b["args"]) for b in sent if b["name"] == "rollback"]
    assert sorted(rollbacks) == [(d, {"version": "1.0.0"}) for d in ids]  # each updated one
    assert state.finished == "halted"
    failed = state.failed_gates()
    assert [(g.device_id, g.gate, g.figure) for g in failed] == [(ids[1], "agreement>=0.98", 0.97)]
    started = kinds(sqlite_store, state.rollout_id, RecordKind.DEVICE_STARTED)
    assert {r.device_id for r in started} == set(ids)
    job = sim.state(ids[0])["update"]
    assert job is not None and job["kind"] == "rollback"  # the canary passed, then went back
    assert all(served(sim, d) == "1.0.0" for d in ids)


def test_devices_already_on_the_bundle_are_left_alone(
    sqlite_store: SqlStore,
    console: Console,
    sims: Sims,
    bundle: BundleInfo,
    http_sources: SourceFactory,
) -> None:
    sim = sims(3)
    first = run(sqlite_store, console, http_sources, plan(sim, canary=1, wave="2"), bundle)
    assert first.finished == "succeeded"
    assert console.view.wait(
        lambda v: all((r := v.row(d)) and r.model_sha256 == bundle.sha256 for d in sim.device_ids),
        10,
    )
    again = run(sqlite_store, console, http_sources, plan(sim, canary=1, wave="2"), bundle)
    # Not deployed again, not gated, never rolled back: they were there before it began.
    assert again.finished == "succeeded" and again.counts() == {"already_current": 3}
    assert "3 already on it" in again.reason
    assert not kinds(sqlite_store, again.rollout_id, RecordKind.DEVICE_STARTED)
    assert not kinds(sqlite_store, again.rollout_id, RecordKind.GATE_RESULT)


def test_a_deploy_sent_but_never_recorded_is_adopted_not_repeated(
    sqlite_store: SqlStore,
    console: Console,
    sims: Sims,
    bundle: BundleInfo,
    http_sources: SourceFactory,
) -> None:
    """A driver killed between sending a deploy and recording it: the next one meets
    `update.busy`, asks `update.status`, and adopts the job when it installs its version."""
    sim = sims(1)
    (dev,) = sim.device_ids
    sim.set_knobs([dev], latency={"trial": 3.0})  # busy for a while after the deploy
    e = engine(sqlite_store, console, http_sources)
    created = e.create(plan(sim, canary=1, gates=""), bundle)
    source = http_sources("http", bundle)
    try:
        args = DeployRequest(source=source.source_for(dev), sha256=bundle.sha256,
                             size=bundle.size, version=bundle.version).to_args()  # fmt: skip
        reply = console.client.request(dev, "deploy", args)
        assert reply.ok
        job = reply.result["job"]
        sqlite_store.append(  # what the dead driver had recorded before it died
            [
                NewRecord(
                    RecordKind.WAVE_STARTED,
                    {"wave": 0, "devices": [dev]},
                    rollout_id=created.rollout_id,
                )
            ],
            who=("dead-key", "dead"),
        )
        sent: list[str] = []
        console.client.on_sent = lambda body, target: sent.append(str(body["name"]))
        state = e.drive(created.rollout_id)
    finally:
        console.client.on_sent = None
        source.close()
    assert state.finished == "succeeded"
    # One deploy from the new driver (answered update.busy), then only the question.
    assert sent.count("deploy") == 1 and "update.status" in sent
    started = kinds(sqlite_store, state.rollout_id, RecordKind.DEVICE_STARTED)
    assert [r.data["job"] for r in started] == [job]  # adopted, not a second job
    assert sim.state(dev)["update"]["job"] == job and served(sim, dev) == "2.0.0"
