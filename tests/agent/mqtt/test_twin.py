"""The agent as a KubeEdge device: actual twin values out, desired ones in."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.protocol.events import EventKind
from agent.protocol.messages import loads
from agent.protocol.topics import TwinTopics
from tests.agent.mqtt.conftest import (
    DEVICE,
    MakeHarness,
    agent_config,
    json_on,
    listening,
    wait_until,
)
from tests.mqtt_broker import Broker

TWIN = TwinTopics("edge", DEVICE)


def test_twin_reports_actual_values_and_records_a_desired_version(
    tmp: Path, broker: Broker, harness: MakeHarness
) -> None:
    with listening(
        broker, str(TWIN.update), str(TWIN.get), f"edgerun/v1/{DEVICE}/events",
        f"edgerun/v1/{DEVICE}/state",
    ) as cloud:  # fmt: skip
        h = harness(agent_config(tmp, broker, None, commands={"require_signature": False},
                                 kubeedge={"enabled": True, "namespace": "edge"}))  # fmt: skip
        h.wait_connected()
        assert cloud.wait_for(lambda f: f.on("/twin/update") and f.on("/twin/get"))
        update = loads(cloud.on("/twin/update")[0])
        actual = {k: v["actual"]["value"] for k, v in update["twin"].items()}
        assert actual["model_name"] == "digits" and actual["model_version"] == "1.0.0"
        assert actual["health"] == "ready"
        assert all(isinstance(v, str) and len(v.encode()) < 512 for v in actual.values())
        assert all(v["metadata"] == {"type": "string"} for v in update["twin"].values())
        # The cloud wants another version: the edge core sends a delta.
        delta = {
            "event_id": "e-1", "timestamp": 1,
            "twin": {"model_version": {"expected": {"value": "2.0.0", "metadata": {"timestamp": 1}},
                                       "metadata": {"type": "string"}}},
            "delta": {"model_version": "2.0.0"},
        }  # fmt: skip
        cloud.client.publish(str(TWIN.update_delta), json.dumps(delta), qos=1)
        assert cloud.wait_for(
            lambda f: any(e["kind"] == "twin.desired" for e in json_on(f, "/events"))
        )
        event = next(e for e in json_on(cloud, "/events") if e["kind"] == "twin.desired")
        assert event["data"]["model_version"] == "2.0.0" and "2.0.0" in event["reason"]
        assert cloud.wait_for(
            lambda f: json_on(f, "/state")[-1]["desired"] == {"model_version": "2.0.0"}
        )
        # A repeat of the same desire is not news; junk is ignored, the link lives on.
        cloud.client.publish(str(TWIN.update_delta), json.dumps(delta), qos=1)
        cloud.client.publish(str(TWIN.get_result), b"{not json", qos=1)
        cloud.client.publish(str(TWIN.get_result), json.dumps({**delta, "delta": None}), qos=1)
        h.agent.events.emit(EventKind.COMMAND_REFUSED, "test marker: after the twin messages")
        assert cloud.wait_for(
            lambda f: any(e["reason"].startswith("test marker") for e in json_on(f, "/events"))
        )
        assert sum(e["kind"] == "twin.desired" for e in json_on(cloud, "/events")) == 1
        assert h.link.online.is_set()


def test_one_twin_report_per_connect_and_health_stopped_after_a_clean_stop(
    tmp: Path, broker: Broker, harness: MakeHarness
) -> None:
    with listening(broker, str(TWIN.update)) as cloud:
        h = harness(agent_config(tmp, broker, None, commands={"require_signature": False},
                                 telemetry={"interval_s": 3600.0},
                                 kubeedge={"enabled": True, "namespace": "edge"}))  # fmt: skip
        h.wait_connected()
        assert cloud.wait_for(lambda f: len(f.on("/twin/update")) >= 1)
        # An event that re-publishes the state, while nothing the twin shows changed.
        h.agent.events.emit(EventKind.OVERLOAD_CLEARED, "test: nothing the twin shows changed")
        h.link.client.disconnect()  # a clean disconnect: the client connects again
        assert wait_until(lambda: h.link.client.connections == 2 and h.link.online.is_set())
        assert cloud.wait_for(lambda f: len(f.on("/twin/update")) >= 2)
        time.sleep(0.5)  # a duplicate report would have arrived by now
        updates = [loads(p) for p in cloud.on("/twin/update")]
        assert len(updates) == 2, updates  # one per connect
        assert all(u["twin"]["health"]["actual"]["value"] == "ready" for u in updates)
        h.stop()
        assert cloud.wait_for(lambda f: len(f.on("/twin/update")) == 3)
        last = loads(cloud.on("/twin/update")[-1])
        assert last["twin"]["health"]["actual"]["value"] == "stopped"


def test_a_hostile_twin_cannot_grow_the_desired_set_or_send_huge_documents(
    tmp: Path, broker: Broker, harness: MakeHarness
) -> None:
    with listening(broker, f"edgerun/v1/{DEVICE}/events") as feed:
        h = harness(agent_config(tmp, broker, None, commands={"require_signature": False},
                                 kubeedge={"enabled": True, "namespace": "edge"}))  # fmt: skip
        h.wait_connected()
        big = {"event_id": "big", "timestamp": 1, "delta": {"model_version": "9" * 400}}
        big["twin"] = {f"q{i}": {"expected": {"value": "y" * 400}} for i in range(200)}  # ~86 KB
        feed.client.publish(str(TWIN.update_delta), json.dumps(big), qos=1)
        for batch in range(3):  # 60 different properties in all
            delta = {"event_id": f"e-{batch}", "timestamp": 1,
                     "delta": {f"p{batch}-{i}": "x" for i in range(20)}}  # fmt: skip
            feed.client.publish(str(TWIN.update_delta), json.dumps(delta), qos=1)
        twin = h.link.twin
        assert twin is not None
        # One publisher, one topic: the agent handles them in order, big one first.
        assert wait_until(lambda: len(twin.desired) >= 32)
        time.sleep(0.3)  # the rest of the batches, had the cap not held
        assert len(twin.desired) == 32  # the cap, not 60
        assert "model_version" not in twin.desired  # the 86 KB document was not read
        assert h.link.online.is_set() and h.agent.host.ready()
