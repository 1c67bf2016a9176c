"""Bundle sources for `deploy --via http|mqtt`, and a real agent beside the simulator.

The real `edge-agent` (one process, MQTT link on) takes a bundle through
MqttBundleSource, and its retained state and telemetry are read with the same typed
readers as the simulator's: the two must not drift apart.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.state import ReportedState
from agent.protocol.update import DeployRequest, HttpSource, JobAccepted
from agent.signing import load_private_key, load_public_key
from fleet.bundle_source import HttpBundleSource, MqttBundleSource
from fleet.errors import FleetCode, FleetError
from fleet.simulate import Simulator
from tests.fleet._sim import FINAL_KINDS, SimConsole, console_keypair
from tests.helpers import (
    DEMO_KEY,
    DEMO_PUB,
    SAMPLE_BUNDLE,
    AgentProcess,
    base_config,
    make_bundle,
    samples,
    unpack_sample,
    write_config,
)
from tests.mqtt_broker import Broker

TRUST = [load_public_key(DEMO_PUB)]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def bundle(work: Path) -> Path:
    parts = unpack_sample(work / "sample")
    return make_bundle(parts, work / "digits-1.1.0.edgebundle", load_private_key(DEMO_KEY),
                       version="1.1.0")  # fmt: skip


def get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    parts = url.split("/", 3)
    host, port = parts[2].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, "/" + parts[3], headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_http_source_serves_the_one_bundle_with_ranges(bundle: Path) -> None:
    data = bundle.read_bytes()
    with HttpBundleSource(bundle, trust=TRUST, max_connections=2) as source:
        assert source.info.version == "1.1.0" and source.info.name == "digits"
        assert source.info.size == len(data)
        status, headers, body = get(source.url)
        assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
        status, headers, body = get(source.url, {"Range": "bytes=100-199"})
        assert status == 206 and body == data[100:200]
        assert headers["content-range"] == f"bytes 100-199/{len(data)}"
        status, _, body = get(source.url, {"Range": "bytes=1000-"})
        assert status == 206 and body == data[1000:]
        status, _, body = get(source.url, {"Range": "bytes=-10"})
        assert status == 206 and body == data[-10:]
        status, headers, _ = get(source.url, {"Range": f"bytes={len(data)}-"})
        assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
        status, headers, body = get(source.url, method="HEAD")
        assert status == 200 and body == b"" and headers["content-length"] == str(len(data))
        base = "/".join(source.url.split("/", 3)[:3])
        prefix = source.url_path_unquoted.rsplit("/", 1)[0]
        for path in ("/", "/etc/passwd", f"{prefix}/other.edgebundle", f"{prefix}/../x"):
            assert get(base + path)[0] == 404, path
        # More devices than connection slots: they wait their turn, none is refused.
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: get(source.url), range(8)))
        assert all(s == 200 and b == data for s, _, b in results)
        # The deploy arguments are what DeployRequest reads back.
        request = DeployRequest.from_args(source.deploy_args(mode="hot"))
        assert request.source == HttpSource(source.url)
        assert (request.sha256, request.size, request.version, request.name, request.mode) == (
            source.info.sha256, len(data), "1.1.0", "digits", "hot",
        )  # fmt: skip


def test_a_bundle_that_does_not_verify_is_refused_before_serving(bundle: Path, work: Path) -> None:
    with pytest.raises(FleetError) as err:
        HttpBundleSource(bundle, trust=[Ed25519PrivateKey.generate().public_key()])
    assert err.value.code == FleetCode.BUNDLE and "does not verify" in err.value.message
    broken = work / "broken.edgebundle"
    broken.write_bytes(bundle.read_bytes()[:-100])
    with pytest.raises(FleetError) as err:
        MqttBundleSource(None, broken, trust=TRUST)
    assert err.value.code == FleetCode.BUNDLE
    with pytest.raises(FleetError) as err:
        HttpBundleSource(work / "missing.edgebundle", trust=TRUST)
    assert err.value.code == FleetCode.BUNDLE and "cannot read" in err.value.message
    with pytest.raises(FleetError) as err:
        HttpBundleSource(bundle)
    assert err.value.code == FleetCode.BUNDLE and "no trusted bundle key" in err.value.message


# --------------------------------------------------------------------------- a real agent

DEVICE = "real-agent-1"


@pytest.fixture(scope="module")
def fleet_rig(work: Path) -> Iterator[tuple[Broker, AgentProcess, SimConsole, Simulator]]:
    key, pub = console_keypair(work)
    broker = Broker(work).start()
    lines = base_config(work, SAMPLE_BUNDLE).replace(
        'device_id = "test-device"', f'device_id = "{DEVICE}"'
    )
    lines += "\n".join([
        "[mqtt]", "enabled = true", 'host = "127.0.0.1"', f"port = {broker.port}",
        'groups = ["line-1"]', "reconnect_min_s = 0.05", "reconnect_max_s = 0.5",
        "[telemetry]", "interval_s = 0.3",
        "[commands]", f'console_keys = ["{pub}"]',
    ]) + "\n"  # fmt: skip
    agent = AgentProcess(write_config(work / "agent.toml", lines), work / "api.sock")
    console = SimConsole(broker, key)
    sim = Simulator(broker.host, broker.port, 2, prefix="twin", groups=["line-1"],
                    console_keys=[pub], telemetry_interval_s=0.3, latency=0.02,
                    model=("digits", "1.0.0"))  # fmt: skip
    try:
        agent.wait_ready(120)
        sim.__enter__()
        deadline = time.monotonic() + 60
        while True:  # the link subscribes after start: ping until it answers
            try:
                if console.request(DEVICE, "ping", timeout=1).ok:
                    break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise AssertionError(agent.output()) from None
        yield broker, agent, console, sim
    finally:
        sim.close()
        console.close()
        agent.stop()
        broker.stop()


def _infer_once(agent: AgentProcess) -> None:
    """One request, so the agent's telemetry carries `model.live` like the simulator's."""
    x = np.asarray(samples()[0][:1], np.float32)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()  # fmt: skip
    with agent.client() as c:
        status, _, raw = c.request("POST", "/v2/models/digits/infer", body,
                                   {"content-type": "application/json"})  # fmt: skip
    assert status == 200, raw


def _shape(value: Any, depth: int = 2) -> Any:
    """The keys of nested objects down to `depth` (what must agree, not the figures)."""
    if isinstance(value, dict) and depth > 0:
        return {k: _shape(v, depth - 1) for k, v in value.items()}
    return type(value).__name__ if not isinstance(value, int | float) else "number"


def _covers(sim: Any, real: Any, where: str = "") -> list[str]:
    """What the real agent sends that the simulator does not (keys, recursively)."""
    if not isinstance(real, dict):
        return []
    if not isinstance(sim, dict):
        return [where or "."]
    missing = []
    for key, value in real.items():
        if key not in sim:
            missing.append(f"{where}.{key}")
        else:
            missing += _covers(sim[key], value, f"{where}.{key}")
    return missing


def test_real_agent_and_simulator_agree_on_state_and_telemetry(
    fleet_rig: tuple[Broker, AgentProcess, SimConsole, Simulator],
) -> None:
    _, agent, console, sim = fleet_rig
    twin = sim.device_ids[0]
    _infer_once(agent)
    assert console.wait(
        lambda c: (
            any(t.model and "live" in t.model for t in c.telemetry(DEVICE))
            and any(t.model and "live" in t.model for t in c.telemetry(twin))
        )
    )
    real_state = ReportedState.from_json(console.state(DEVICE))
    sim_state = ReportedState.from_json(console.state(twin))
    assert real_state.groups == sim_state.groups == ("line-1",)
    assert real_state.model is not None and sim_state.model is not None
    assert real_state.model.name == sim_state.model.name == "digits"
    assert real_state.health.word == sim_state.health.word == "ready"
    assert _covers(console.state(twin), console.state(DEVICE)) == []
    real_t = next(t for t in reversed(console.telemetry(DEVICE)) if t.model and "live" in t.model)
    sim_t = next(t for t in reversed(console.telemetry(twin)) if t.model and "live" in t.model)
    missing = _covers(sim_t.to_json(), real_t.to_json())
    # Figures that depend on the host or on traffic the simulator does not model.
    allowed = {".system.temperatures_c", ".model.live.top1_samples"}
    assert [m for m in missing if not any(m.startswith(a) for a in allowed)
            and ".top1." not in m and ".errors." not in m] == []  # fmt: skip
    assert _shape(sim_t.inference["interval"]) == _shape(real_t.inference["interval"])
    # Both answer a ping the same way.
    real_ping, sim_ping = console.request(DEVICE, "ping"), console.request(twin, "ping")
    assert set(real_ping.result) == set(sim_ping.result)


def test_mqtt_source_delivers_to_a_real_agent_and_the_simulator(
    fleet_rig: tuple[Broker, AgentProcess, SimConsole, Simulator], bundle: Path
) -> None:
    _, agent, console, sim = fleet_rig
    twin = sim.device_ids[1]
    client = console.listener.client
    trial = {"window_s": 0, "max_p95_ratio": 50}
    with MqttBundleSource(client, bundle, trust=TRUST) as source:
        for device in (DEVICE, twin):
            reply = console.request(
                device,
                "deploy",
                source.deploy_args(source.transfer_for(device), trial=trial),
                timeout=30,
            )
            assert reply.ok, reply
            JobAccepted.from_json(reply.result)
        for device in (DEVICE, twin):
            final = console.wait_event(device, FINAL_KINDS, timeout=120)
            assert final.kind == "update.committed", (final, agent.output()[-3000:])
            assert final.data["model"]["version"] == "1.1.0"
            assert final.data["model"]["sha256"] == source.info.sha256
    assert (
        console.kinds(DEVICE, "update.")[0]
        == console.kinds(twin, "update.")[0]
        == "update.accepted"
    )
    real = ReportedState.from_json(
        console.wait_state(DEVICE, lambda s: s["update"] and s["update"]["phase"] == "committed")
    )
    simd = ReportedState.from_json(
        console.wait_state(twin, lambda s: s["update"] and s["update"]["phase"] == "committed")
    )
    assert real.last_known_good is not None and simd.last_known_good is not None
    assert real.last_known_good.version == simd.last_known_good.version == "1.0.0"
    # The phases the agent went through are the simulator's (no shadow was asked).
    real_phases = list(dict.fromkeys(console.kinds(DEVICE, "update.")))
    sim_phases = list(dict.fromkeys(console.kinds(twin, "update.")))
    assert real_phases == sim_phases
