"""ReportedState: the retained `state` as typed values, read leniently but never loosely."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from agent.protocol.messages import Code, ProtocolError
from agent.protocol.state import Health, ModelInfo, ReportedState, Slots, UpdateSnapshot

SHA_A, SHA_B = "a" * 64, "b" * 64

FULL = ReportedState(
    device_id="press-17",
    agent_version="0.1.0",
    model=ModelInfo("digits", "1.1.0", SHA_B, "onnxruntime"),
    slots=Slots(SHA_B, SHA_A),
    last_known_good=ModelInfo("digits", "1.0.0", SHA_A),
    groups=("line-a", "eu"),
    config_digest="c" * 64,
    tunable={"telemetry.interval_s": 10.0},
    health=Health(ready=True, overloaded=False),
    desired={"model_version": "2.0.0"},
    update=UpdateSnapshot(
        "j1", "deploy", "committed", "1.1.0", None, ModelInfo("digits", "1.1.0", SHA_B)
    ),
)

# What an agent of the previous release published (docs/mqtt.md before this change):
# no groups, no last_known_good, no update field at all.
OLDER_AGENT = {
    "device_id": "press-17", "agent_version": "0.0.9",
    "model": {"name": "digits", "version": "1.0.0", "sha256": SHA_A, "runtime": "onnxruntime"},
    "slots": {"current": SHA_A, "previous": None},
    "config_digest": "d" * 64,
    "tunable": {"telemetry.interval_s": 10.0, "log_level": "info"},
    "health": {"ready": True, "overloaded": False},
    "desired": {},
}  # fmt: skip


def test_round_trip_through_json_text() -> None:
    text = json.dumps(FULL.to_json())
    assert ReportedState.from_json(json.loads(text)) == FULL


def test_an_older_agents_state_reads_with_defaults() -> None:
    state = ReportedState.from_json(OLDER_AGENT)
    assert state.model == ModelInfo("digits", "1.0.0", SHA_A, "onnxruntime")
    assert state.groups == () and state.last_known_good is None and state.update is None
    assert state.health.word == "ready"


def test_a_newer_agents_extra_fields_are_left_out() -> None:
    newer = {**FULL.to_json(), "battery": {"percent": 80}, "health": {
        "ready": True, "overloaded": False, "thermal_throttled": True}}  # fmt: skip
    newer["update"] = {**newer["update"], "eta_s": 3}
    assert ReportedState.from_json(newer) == FULL


def test_an_unknown_phase_reads_as_text() -> None:
    body = {**FULL.to_json(), "update": {"job": "j2", "kind": "deploy", "phase": "warming",
                                          "version": "2.0.0"}}  # fmt: skip
    update = ReportedState.from_json(body).update
    assert update is not None and update.phase == "warming"
    assert update.known_phase is None and not update.final


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"device_id": 7}, "device_id"),
        ({"device_id": None}, "device_id"),
        ({"groups": "line-a"}, "groups"),
        ({"groups": ["ok", 3]}, "groups"),
        ({"health": {"ready": "yes"}}, "health.ready"),
        ({"health": []}, "health."),
        ({"model": {"name": "digits"}}, "model.version"),
        ({"model": "digits"}, "model."),
        ({"last_known_good": {"version": 1}}, "last_known_good.version"),
        ({"slots": {"current": 1}}, "slots.current"),
        ({"tunable": [1]}, "tunable"),
        ({"update": {"job": "j", "phase": 3}}, "update.phase"),
        ({"update": {"phase": "trial"}}, "update.job"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        ReportedState.from_json({**FULL.to_json(), **change})
    assert info.value.code == Code.STATE_MALFORMED == "state.malformed"
    assert field in info.value.message, info.value.message


@pytest.mark.parametrize("body", [None, [], "state", 3, True])
def test_a_body_that_is_no_object_is_refused(body: object) -> None:
    with pytest.raises(ProtocolError) as info:
        ReportedState.from_json(body)
    assert info.value.code == "state.malformed"


def _mutations(seed: int) -> list[Any]:
    """Every field of the full state replaced by values of each JSON type."""
    rng = random.Random(seed)
    values: list[Any] = [None, True, 0, -1.5, "", "x", [], [1, "a"], {}, {"a": {"b": []}}]
    out: list[Any] = []
    base = FULL.to_json()
    for key in base:
        for value in values:
            out.append({**base, key: value})
        sub = base[key]
        if isinstance(sub, dict):
            for inner in sub:
                out.append({**base, key: {**sub, inner: rng.choice(values)}})
    return out


def test_any_json_gives_a_state_or_a_protocol_error() -> None:
    # The console reads whatever the broker holds: no TypeError/KeyError ever escapes.
    read = 0
    for body in _mutations(7):
        try:
            state = ReportedState.from_json(body)
        except ProtocolError as exc:
            assert exc.code == "state.malformed"
        else:
            read += 1
            assert isinstance(state.device_id, str)
    assert read > 10  # some mutations (None for optional fields) are fine
