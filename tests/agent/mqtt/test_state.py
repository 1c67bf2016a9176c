"""The retained state a real link publishes, read back through ReportedState, and the
events that make the link recompute it."""

from __future__ import annotations

from pathlib import Path

from agent.protocol.events import EventKind
from agent.protocol.state import ReportedState
from tests.agent.mqtt.conftest import DEVICE, MakeHarness, agent_config, json_on, listening
from tests.mqtt_broker import Broker


def test_the_retained_state_reads_as_reported_state_and_follows_the_kinds(
    tmp: Path, broker: Broker, harness: MakeHarness
) -> None:
    with listening(broker, f"edgerun/v1/{DEVICE}/state") as feed:
        h = harness(agent_config(tmp, broker, None, telemetry={"interval_s": 3600.0},
                                 mqtt={"groups": ["line-a", "eu"]},
                                 commands={"require_signature": False}))  # fmt: skip
        h.wait_connected()
        assert feed.wait_for(lambda f: len(f.on("/state")) >= 1)
        state = ReportedState.from_json(json_on(feed, "/state")[-1])
        assert state.device_id == DEVICE and state.groups == ("line-a", "eu")
        assert state.model is not None and state.slots.current == state.model.sha256
        assert state.last_known_good is None and state.update is None  # no update yet
        assert state.health.word == "ready"
        assert state.to_json() == json_on(feed, "/state")[-1]  # nothing lost on the way

        # Which events make the link recompute the state is the kind's property.
        calls: list[bool] = []
        publish = h.link.publish_state

        def counted(force: bool = False) -> None:
            calls.append(force)
            publish(force)

        h.link.publish_state = counted  # type: ignore[method-assign]
        for kind in EventKind:
            before = len(calls)
            h.agent.events.emit(kind, f"test: {kind}")
            assert (len(calls) > before) == kind.republishes_state, kind
