"""Topics, canonical JSON and signatures, message schemas, the KubeEdge twin codec."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import twin
from agent.protocol.canonical import SignatureError, canonical_json, sign_body, verify_body
from agent.protocol.messages import (
    Code,
    Command,
    EventMessage,
    ProtocolError,
    Reply,
    Status,
    TelemetryMessage,
    loads,
)
from agent.protocol.topics import (
    DeviceTopics,
    Topic,
    TopicError,
    TopicFilter,
    TwinTopics,
    command_subscriptions,
    console_reply,
    device_id,
    device_of,
    fleet_filter,
    group_command,
    is_legacy_command_filter,
    is_reply_topic,
    parse_command_topic,
    portability_problem,
    target_name,
)
from agent.signing import key_id

# ----------------------------------------------------------------------------- topics


def test_device_topics_follow_the_design() -> None:
    t = DeviceTopics("dev-1")
    assert str(t.status) == "edgerun/v1/dev-1/status"
    assert str(t.state) == "edgerun/v1/dev-1/state"
    assert str(t.telemetry) == "edgerun/v1/dev-1/telemetry"
    assert str(t.events) == "edgerun/v1/dev-1/events"
    assert str(t.command("config.get")) == "edgerun/v1/dev-1/cmd/config-get"  # portable
    assert str(t.legacy_command("config.get")) == "edgerun/v1/dev-1/cmd/config.get"
    assert str(t.bundle("tx-1")) == "edgerun/v1/dev-1/bundle/tx-1"
    assert str(group_command("lab", "ping")) == "edgerun/v1/group/lab/cmd/ping"
    assert device_of("edgerun/v1/dev-1/telemetry") == "dev-1"
    assert device_of("edgerun/v1/group/x/cmd/ping") is None
    assert fleet_filter("telemetry").matches(t.telemetry)


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "group", "console", "é", ".."])
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        device_id(bad)


def test_topics_and_filters_are_validated() -> None:
    for bad in ("", "a/+/b", "a/#", "a\x00b"):
        with pytest.raises(TopicError):
            Topic(bad)
    for bad in ("a/#/b", "a/b#", "a+/b", ""):
        with pytest.raises(TopicError):
            TopicFilter(bad)
    f = TopicFilter("edgerun/v1/+/cmd/#")
    assert f.matches("edgerun/v1/d/cmd/ping") and f.matches("edgerun/v1/d/cmd")
    assert not f.matches("edgerun/v1/d/status")
    assert not TopicFilter("#").matches("$hw/events/device/ns/n/twin/update")
    assert TopicFilter("a/+").matches("a/") and not TopicFilter("a/+").matches("a")


def test_subscriptions_come_from_the_command_names() -> None:
    filters = command_subscriptions("d", ["g1"], {"ping": 1, "logs": 2})
    assert [str(f) for f in filters] == [
        "edgerun/v1/d/cmd/logs", "edgerun/v1/d/cmd/ping",
        "edgerun/v1/group/g1/cmd/logs", "edgerun/v1/group/g1/cmd/ping",
    ]  # fmt: skip
    route = parse_command_topic("edgerun/v1/group/g1/cmd/config.set")
    assert route is not None and (route.scope, route.target, route.name) == (
        "group",
        "g1",
        "config.set",
    )
    assert parse_command_topic("edgerun/v1/d/cmd/Bad") is None
    assert parse_command_topic("other/v1/d/cmd/ping") is None


def test_command_names_have_a_portable_spelling_and_the_legacy_one_still_parses() -> None:
    names = ["config.get", "config.set", "ping", "update.cancel", "update.status"]
    filters = [str(f) for f in command_subscriptions("d", ["g1"], names)]
    # Portable first (what a NATS broker grants), then the dotted ones for old consoles.
    assert filters == [
        "edgerun/v1/d/cmd/config-get", "edgerun/v1/d/cmd/config-set", "edgerun/v1/d/cmd/ping",
        "edgerun/v1/d/cmd/update-cancel", "edgerun/v1/d/cmd/update-status",
        "edgerun/v1/group/g1/cmd/config-get", "edgerun/v1/group/g1/cmd/config-set",
        "edgerun/v1/group/g1/cmd/ping", "edgerun/v1/group/g1/cmd/update-cancel",
        "edgerun/v1/group/g1/cmd/update-status",
        "edgerun/v1/d/cmd/config.get", "edgerun/v1/d/cmd/config.set",
        "edgerun/v1/d/cmd/update.cancel", "edgerun/v1/d/cmd/update.status",
        "edgerun/v1/group/g1/cmd/config.get", "edgerun/v1/group/g1/cmd/config.set",
        "edgerun/v1/group/g1/cmd/update.cancel", "edgerun/v1/group/g1/cmd/update.status",
    ]  # fmt: skip
    assert [f for f in filters if is_legacy_command_filter(f)] == filters[10:]
    assert not [f for f in filters[:10] if "." in f]
    assert [str(f) for f in command_subscriptions("d", [], names, legacy=False)] == filters[:5]
    for name in names:
        for topic in (DeviceTopics("d").command(name), DeviceTopics("d").legacy_command(name)):
            route = parse_command_topic(str(topic))
            assert route is not None and route.name == name, topic
    assert str(group_command("g1", "update.status")) == "edgerun/v1/group/g1/cmd/update-status"
    # One to one: `-` is never part of a name, and the spellings do not mix.
    for bad in ("config-", "-get", "config--get", "config.get-x", "Config-get"):
        assert parse_command_topic(f"edgerun/v1/d/cmd/{bad}") is None, bad


def test_names_that_clustered_brokers_cannot_carry_are_named() -> None:
    assert portability_problem("device id", "press-17_a") is None
    problem = portability_problem("device id", "press.17")
    assert problem is not None and "'press.17'" in problem and "NATS" in problem


def test_twin_topics() -> None:
    t = TwinTopics("default", "dev-1")
    assert str(t.update) == "$hw/events/device/default/dev-1/twin/update"
    assert str(t.update_delta) == "$hw/events/device/default/dev-1/twin/update/delta"
    assert str(t.get) == "$hw/events/device/default/dev-1/twin/get"
    assert str(t.get_result) == "$hw/events/device/default/dev-1/twin/get/result"
    with pytest.raises(TopicError):
        TwinTopics("default", "Dev_1")


# ----------------------------------------------------------------------------- signing


def test_canonical_json_is_sorted_compact_utf8_without_sig() -> None:
    body = {"b": 1, "a": {"d": [1, 2.5], "c": "é"}, "sig": "ignored"}
    assert canonical_json(body) == '{"a":{"c":"é","d":[1,2.5]},"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_sign_and_verify() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = sign_body({"id": "1", "name": "ping", "args": {}}, key)
    assert verify_body(body, [other.public_key(), key.public_key()]) == key_id(key.public_key())
    # Key order in the JSON text does not matter: the canonical form does.
    reordered = json.loads(json.dumps(dict(reversed(list(body.items())))))
    assert verify_body(reordered, [key.public_key()])
    cases = {
        "unsigned": ({k: v for k, v in body.items() if k != "sig"}, Code.UNSIGNED),
        "other key": (body, Code.BAD_SIGNATURE),
        "tampered": ({**body, "args": {"x": 1}}, Code.BAD_SIGNATURE),
        "not base64": ({**body, "sig": "%%%"}, Code.BAD_SIGNATURE),
        "short": ({**body, "sig": base64.b64encode(b"x" * 10).decode()}, Code.BAD_SIGNATURE),
        "not a string": ({**body, "sig": 5}, Code.BAD_SIGNATURE),
    }
    for name, (candidate, code) in cases.items():
        keys = [other.public_key()] if name == "other key" else [key.public_key()]
        with pytest.raises(SignatureError) as info:
            verify_body(candidate, keys)
        assert info.value.code == code, name


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 1, "a": 2}',
        b"[" * 100_000,
        b"{",
        b'{"id": "\\ud800"}',
        b'{"\\udfff": 1}',
        b'[[["\\ud83d"]]]',
        b'"\\udc00x"',
        b'{"a": 1e999}',
        b"[-1e400]",
        b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}",  # deeper than MAX_DEPTH
        b"[" * 990 + b"]" * 990,  # the parser takes it; the encoders would not
    ],
)
def test_strict_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        loads(payload)
    assert info.value.code == Code.MALFORMED


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"name": "ping"}, '"id" is missing'),
        ({"id": "", "name": "ping"}, '"id" must be'),
        ({"id": "x" * 129, "name": "ping"}, "1-128 printable ASCII"),
        ({"id": "caf\u00e9", "name": "ping"}, "1-128 printable ASCII"),
        ({"id": "a b", "name": "ping"}, "1-128 printable ASCII"),
        ({"id": "1", "name": "Ping"}, "lower-case words"),
        ({"id": "1", "name": "ping", "to": "dev/a"}, '"to" must be a device id'),
        ({"id": "1", "name": "ping", "to": "group:"}, '"to" must be a device id'),
        ({"id": "1", "name": "ping", "reply_to": "x/y"}, "not a console reply topic"),
        ({"id": "1", "name": "ping", "expires_at": 10**400}, '"expires_at" must be a number'),
        ({"id": "1", "name": "ping", "issued_at": -1}, '"issued_at" must be a number'),
        ({"id": "1", "name": "ping", "args": [1]}, '"args" must be an object'),
        ({"id": "1", "name": "ping", "expires_at": "soon"}, '"expires_at" must be a number'),
        ({"id": "1", "name": "ping", "expires_at": True}, '"expires_at" must be a number'),
        ({"id": "1", "name": "ping", "extra": 1}, "unknown field 'extra'"),
        ({"id": 1, "name": "ping"}, '"id" must be'),
    ],
)
def test_command_shape_errors(body: dict[str, object], fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        Command.from_json(body)
    assert fragment in info.value.message


def test_command_and_reply_round_trip() -> None:
    body = {"id": "1", "name": "config.get", "args": {"keys": ["a"]}, "expires_at": 5, "to": "d"}
    assert Command.from_json(body).to_json() == {**body, "expires_at": 5.0}
    ok = Reply.success("1", {"x": 1})
    assert Reply.from_json(ok.to_json()) == ok
    bad = Reply.failure("2", "command.unknown", "no such command")
    assert bad.to_json() == {
        "id": "2",
        "ok": False,
        "error": {"code": "command.unknown", "message": "no such command"},
    }
    assert Reply.from_json(bad.to_json()) == bad


# ----------------------------------------------------------------------------- twin


def test_twin_update_matches_the_design() -> None:
    body = json.loads(twin.encode_update({"model_version": "1.0.0"}, event_id="e1"))
    assert body["event_id"] == "e1" and isinstance(body["timestamp"], int)
    prop = body["twin"]["model_version"]
    assert prop["actual"]["value"] == "1.0.0"
    assert isinstance(prop["actual"]["metadata"]["timestamp"], int)
    assert prop["metadata"] == {"type": "string"}
    assert set(json.loads(twin.encode_get(event_id="g"))) == {"event_id", "timestamp"}


def test_twin_values_are_short_strings() -> None:
    twin.encode_update({"v": "é" * 255})  # 510 bytes
    with pytest.raises(twin.TwinError, match="511"):
        twin.encode_update({"v": "x" * 512})
    with pytest.raises(twin.TwinError):
        twin.encode_update({"bad name!": "x"})


def test_twin_delta_and_get_result_decode() -> None:
    delta = {
        "event_id": "e", "timestamp": 1,
        "twin": {"model_version": {"expected": {"value": "2.0.0", "metadata": {"timestamp": 1}},
                                   "actual": {"value": "1.0.0"}, "metadata": {"type": "string"}},
                 "gone": {"expected": {"value": "x"}, "metadata": {"type": "deleted"}}},
        "delta": {"model_version": "2.0.0"},
    }  # fmt: skip
    doc = twin.decode(json.dumps(delta).encode())
    assert doc.delta == {"model_version": "2.0.0"}
    assert doc.expected == {"model_version": "2.0.0"} and doc.actual == {"model_version": "1.0.0"}
    result = {k: v for k, v in delta.items() if k != "delta"}
    assert twin.decode(json.dumps(result).encode()).desired() == {"model_version": "2.0.0"}
    for bad in (b"[]", b'{"twin": []}', b'{"timestamp": "x"}', b'{"delta": {"a": 1}}',
                json.dumps({"twin": {"a": {"expected": {"value": "x" * 600}}}}).encode()):  # fmt: skip
        with pytest.raises(ProtocolError):
            twin.decode(bad)


def test_the_documented_signature_vector() -> None:
    """docs/mqtt.md gives this vector to console authors; ed25519 is deterministic."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    body = {"id": "7f3c", "name": "config.set", "args": {"values": {"telemetry.interval_s": 5}},
            "issued_at": 1767225600, "expires_at": 1767225660, "to": "dev-a"}  # fmt: skip
    assert canonical_json(body) == (
        b'{"args":{"values":{"telemetry.interval_s":5}},"expires_at":1767225660,"id":"7f3c",'
        b'"issued_at":1767225600,"name":"config.set","to":"dev-a"}'
    )
    assert sign_body(body, key)["sig"] == (
        "MNHfZfoopJ58RxgxlKlBwyySSd1WcI3cbLkmGoVS5udd0nzcZu9hil+/oCB2Xq7a3Z7DuFP/VTrjw+S3NGtRAg=="
    )
    docs = (Path(__file__).parents[3] / "docs/mqtt.md").read_text()
    assert sign_body(body, key)["sig"] in docs


def test_reply_topics_are_exactly_the_console_reply_topics() -> None:
    assert is_reply_topic(str(console_reply("ops-1")))
    for bad in ["edgerun/v1/console/ops/reply/x", "edgerun/v1/console//reply",
                "edgerun/v1/console/../reply", "edgerun/v1/console/+/reply",
                "edgerun/v1/console/#", "edgerun/v1/dev-a/telemetry", "edgerun/v2/console/a/reply",
                "/edgerun/v1/console/a/reply", "edgerun/v1/console/a\u00e9/reply",
                "edgerun/v1/console/a\nb/reply", "", 5, None]:  # fmt: skip
        assert not is_reply_topic(bad), bad


def test_targets_are_a_device_id_or_a_group() -> None:
    assert target_name("dev-a") == "dev-a" and target_name("group:lab") == "group:lab"
    for bad in ["", "group:", "group:a/b", "dev a", "dev/a", "console", "group", 7, "d\u00e9v"]:
        assert target_name(bad) is None, bad


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip
_fields = ["id", "name", "args", "ok", "error", "result", "device_id", "state", "since", "seq",
           "ts", "kind", "reason", "data", "interval_s", "inference", "system", "model",
           "outbox", "agent_version", "expires_at", "issued_at", "to", "reply_to", "sig"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(_fields), _values, max_size=6) | _values)
def test_every_reader_raises_only_protocol_errors(obj: object) -> None:
    """What a console reads from devices (and the device from consoles) is refused with
    the error root, whatever its shape."""
    for reader in (Command, Reply, Status, EventMessage, TelemetryMessage):
        try:
            reader.from_json(obj)
        except ProtocolError as exc:
            assert exc.code in (Code.MALFORMED, Code.BAD_REPLY_TOPIC, Code.BAD_SIGNATURE)
            assert exc.message


def test_the_agent_warns_at_start_of_names_nats_cannot_carry(tmp: Path) -> None:
    from agent.config.loader import parse_config
    from agent.link import settings

    base = {"state_dir": str(tmp / "s"), "mqtt": {"enabled": True}}
    fine = parse_config(
        {**base, "device_id": "press-17", "mqtt": {"groups": ["line_a"]}}, environ={}
    )
    assert settings.portability_warnings(fine) == []
    dotted = parse_config(
        {**base, "device_id": "press.17", "mqtt": {"enabled": True, "groups": ["ok", "eu.west"]}},
        environ={},
    )
    warnings = settings.portability_warnings(dotted)
    assert len(warnings) == 2, warnings
    assert "'press.17'" in warnings[0] and "device_id" in warnings[0]
    assert "mqtt.groups[1]" in warnings[1] and "'eu.west'" in warnings[1]
