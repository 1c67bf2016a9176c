"""KubeEdge twin -> release index -> deploy, through a real agent, a real mosquitto and a
real HTTP server; the UpdateService is the recording double of the port."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.link.twin import DESIRED_FILE
from agent.protocol.events import EventKind
from agent.protocol.messages import loads
from agent.protocol.topics import TwinTopics
from agent.update.index import IndexGuard
from agent.update.poll import PullUpdates
from agent.update.repository import Repository, http_getter
from tests.agent.mqtt.conftest import (
    DEVICE,
    Harness,
    MakeHarness,
    agent_config,
    listening,
    wait_until,
)
from tests.agent.update.index.conftest import NAME, Served, release, signed
from tests.agent.update.index.test_poll import RecordingService
from tests.mqtt_broker import Broker, Listener
from tests.system.test_kubeedge_manifests import REPORTED

TWIN = TwinTopics("edge", DEVICE)


def _delta(version: object) -> bytes:
    return json.dumps({
        "event_id": "e-1", "timestamp": 1,
        "twin": {"model_version": {"expected": {"value": version}, "metadata": {"type": "string"}}},
        "delta": {"model_version": version},
    }).encode()  # fmt: skip


def _actual(cloud: Listener) -> list[dict[str, str]]:
    out = []
    for payload in cloud.on("/twin/update"):
        doc = loads(payload)
        out.append({k: v["actual"]["value"] for k, v in doc["twin"].items()})
    return out


def _attach(h: Harness, tmp: Path, key: Ed25519PrivateKey, server: Served) -> RecordingService:
    service = RecordingService()
    guard = IndexGuard(h.config.state_dir, [key.public_key()])
    repo = Repository(server.url(), guard, http_getter(5, 5, 2))

    def served() -> tuple[str, str] | None:
        model = h.agent.host.model
        return None if model is None else (model.manifest.name, model.manifest.version)

    pull = PullUpdates(repo, service, served, h.agent.events.emit, poll_s=0)
    h.link.attach_pull(pull)
    pull.start()
    return service


def test_a_desired_version_deploys_through_the_index_and_survives_a_restart(
    tmp: Path, broker: Broker, harness: MakeHarness, key: Ed25519PrivateKey, http_server: Served
) -> None:
    http_server.files["/index.json"] = (200, signed(key, 1, release("1.0.0"), release("2.0.0")))
    config = agent_config(tmp, broker, None, commands={"require_signature": False},
                          kubeedge={"enabled": True, "namespace": "edge"})  # fmt: skip
    with listening(broker, str(TWIN.update), f"edgerun/v1/{DEVICE}/events") as cloud:
        h = harness(config)
        service = _attach(h, tmp, key, http_server)
        h.wait_connected()
        assert cloud.wait_for(lambda f: bool(_actual(f)))
        first = _actual(cloud)[0]
        assert first["model_version"] == "1.0.0" and first["model_status"] == "serving"
        assert "p95_ms" in first
        assert set(first) == REPORTED  # what deploy/kubeedge/devicemodel.yaml declares
        cloud.client.publish(str(TWIN.update_delta), _delta("2.0.0"), qos=1)
        assert service.deployed.wait(30)  # hang guard
        [request] = service.deploys
        assert (request.version, request.origin, request.name) == ("2.0.0", "twin", NAME)
        assert json.loads((tmp / "state" / DESIRED_FILE).read_text()) == {"model_version": "2.0.0"}
        # An unknown version: the twin's actual model_status says why.
        cloud.client.publish(str(TWIN.update_delta), _delta("9.9.9"), qos=1)
        assert cloud.wait_for(
            lambda f: any(a.get("model_status", "").startswith("failed: update.no_such_version")
                          for a in _actual(f)), timeout=30,
        )  # fmt: skip
        status = next(a["model_status"] for a in _actual(cloud) if "no_such" in a["model_status"])
        assert "9.9.9" in status and len(status.encode()) < 512
        assert cloud.wait_for(lambda f: any(b"update.pull_refused" in p for p in f.on("/events")))
        refused = [loads(p) for p in cloud.on("/events") if b"update.pull_refused" in p]
        assert refused and refused[0]["data"]["code"] == "update.no_such_version"
        # Junk from the twin is ignored: the wrong type, a value over 512 bytes.
        cloud.client.publish(str(TWIN.update_delta), _delta(5), qos=1)
        cloud.client.publish(str(TWIN.update_delta), _delta("1." + "1" * 600), qos=1)
        h.agent.events.emit(EventKind.COMMAND_REFUSED, "test marker: after the junk")
        assert cloud.wait_for(lambda f: any(b"test marker" in p for p in f.on("/events")))
        assert json.loads((tmp / "state" / DESIRED_FILE).read_text()) == {"model_version": "9.9.9"}
        h.stop()
    # Restart: the kept desired version is re-applied before the cloud says it again.
    http_server.files["/index.json"] = (200, signed(key, 2, release("2.0.0"), release("9.9.9")))
    h2 = harness(config)
    assert h2.link.twin is not None and h2.link.twin.desired == {"model_version": "9.9.9"}
    service2 = _attach(h2, tmp, key, http_server)
    assert service2.deployed.wait(30)
    assert [r.version for r in service2.deploys] == ["9.9.9"]
    assert wait_until(lambda: h2.link.twin_values()["model_status"] == "serving")
    # p95_ms is the served model's, once it answered requests.
    assert h2.link.twin_values()["p95_ms"] == ""
    from tests.helpers import samples

    x, _ = samples()
    model = h2.agent.host.model
    assert model is not None
    for _ in range(5):
        h2.agent.host.infer(model.manifest.name, {model.manifest.inputs[0].name: x[:1]})
    assert wait_until(lambda: float(h2.link.twin_values()["p95_ms"] or 0) > 0)


def test_a_damaged_desired_file_is_ignored(tmp: Path, broker: Broker, harness: MakeHarness) -> None:
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / DESIRED_FILE).write_text('{"model_version": 5, "model_version": 6}')
    h = harness(agent_config(tmp, broker, None, commands={"require_signature": False},
                             kubeedge={"enabled": True, "namespace": "edge"}))  # fmt: skip
    assert h.link.twin is not None and h.link.twin.desired == {}
    values = h.link.twin_values()
    assert values["model_status"] == "serving"  # no release index attached
