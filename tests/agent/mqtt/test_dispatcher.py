"""The command dispatcher on its own: every refusal has a code; nothing crashes it."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config.loader import parse_config
from agent.link.commands import CommandSpec, Dispatcher, RefusalReporter, Request
from agent.link.handlers import build_table
from agent.link.logring import LogRing
from agent.link.readable import UnreadableKeyError, read, read_all
from agent.link.replies import ReplyCache
from agent.link.tunables import Tunables
from agent.protocol.canonical import sign_body
from agent.protocol.messages import Code, dumps, loads
from agent.service import Agent
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE

DEVICE = "dev-a"
TOPIC = f"edgerun/v1/{DEVICE}/cmd/ping"
KEY = Ed25519PrivateKey.generate()
# Every code a reply may carry; "command.failed" (a handler crashed) is not among them.
EXPECTED = {
    Code.MALFORMED, Code.TOO_LARGE, Code.UNKNOWN, Code.BAD_ARGS, Code.EXPIRED, Code.UNSIGNED,
    Code.BAD_SIGNATURE, Code.MISMATCH, Code.NOT_TUNABLE, Code.INVALID_VALUE,
    Code.WRONG_TARGET, Code.NO_TARGET, Code.NO_EXPIRY, Code.LIFETIME_TOO_LONG,
    Code.FROM_THE_FUTURE, Code.ID_REUSED, Code.BAD_REPLY_TOPIC, Code.REPLAYED, Code.BUSY,
    "request.malformed", "input.mismatch", "request.too_large", "model.not_found",
}  # fmt: skip
REPLY = "edgerun/v1/console/c1/reply"


class Setup:
    def __init__(self, tmp: Path) -> None:
        config = parse_config(
            {"device_id": DEVICE, "state_dir": str(tmp / "state"), "api": {"socket": None},
             "trust": {"public_keys": [str(DEMO_PUB)]}, "model": {"bundle": str(SAMPLE_BUNDLE)}},
            environ={},
        )  # fmt: skip
        self.agent = Agent(config)
        self.agent.load_initial_model()
        self.refusals: list[tuple[str, str]] = []
        self.cache = ReplyCache(tmp / "replies.sqlite", 100, 3600)
        self.table = build_table(self.agent, Tunables(self.agent), LogRing(50), dict)

    def dispatcher(self, signed: bool = True, max_payload: int = 4096) -> Dispatcher:
        return Dispatcher(
            DEVICE, ["lab"], self.table, [KEY.public_key()], signed, max_payload, self.cache,
            lambda code, message, **data: self.refusals.append((code, message)),
        )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("dispatch"))
    yield s
    s.agent.host.close()


def send(d: Dispatcher, body: Any, topic: str = TOPIC, v5: bool = True) -> dict[str, Any]:
    payload = body if isinstance(body, bytes) else dumps(body)
    response = d.handle(Request(topic, payload, REPLY if v5 else None, b"corr" if v5 else None))
    assert response is not None
    if v5:
        assert str(response.topic) == REPLY and response.correlation_data == b"corr"
    reply: dict[str, Any] = loads(response.payload)
    assert reply == response.reply.to_json()
    return reply


def signed(name: str = "ping", args: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A signed command as a console sends it: bound to this device, expiring soon;
    a field given as None is left out."""
    body = {"id": fields.pop("id", f"id-{time.monotonic_ns()}"), "name": name, "args": args or {},
            "to": DEVICE, "issued_at": time.time(), "expires_at": time.time() + 60}  # fmt: skip
    merged = {k: v for k, v in {**body, **fields}.items() if v is not None}
    return sign_body(merged, KEY)


def test_a_signed_ping_is_answered(setup: Setup) -> None:
    reply = send(setup.dispatcher(), signed(id="p1"))
    assert reply["id"] == "p1" and reply["ok"] and reply["result"]["device_id"] == DEVICE


def test_each_refusal_has_its_code(setup: Setup) -> None:
    d = setup.dispatcher(max_payload=400)
    cases: list[tuple[Any, str, str]] = [
        (b"x" * 401, TOPIC, Code.TOO_LARGE),
        (b"\xff", TOPIC, Code.MALFORMED),
        ({"id": "1"}, TOPIC, Code.MALFORMED),
        (signed("logs"), TOPIC, Code.MISMATCH),  # topic says ping
        (signed(), "edgerun/v1/dev-b/cmd/ping", Code.WRONG_TARGET),
        (signed(), "edgerun/v1/group/other/cmd/ping", Code.WRONG_TARGET),
        (signed(to="dev-b"), TOPIC, Code.WRONG_TARGET),
        (signed(to=None), TOPIC, Code.NO_TARGET),
        (signed(expires_at=None), TOPIC, Code.NO_EXPIRY),
        (signed(expires_at=time.time() + 7200), TOPIC, Code.LIFETIME_TOO_LONG),
        (signed(issued_at=time.time() + 600, expires_at=time.time() + 700), TOPIC, Code.FROM_THE_FUTURE),
        (signed(), "somewhere/else", Code.MISMATCH),
        ({"id": "2", "name": "ping", "args": {}, "to": DEVICE}, TOPIC, Code.UNSIGNED),
        (sign_body({"id": "3", "name": "ping", "to": DEVICE}, Ed25519PrivateKey.generate()), TOPIC, Code.BAD_SIGNATURE),
        (signed(expires_at=time.time() - 1), TOPIC, Code.EXPIRED),
        (signed("reboot"), f"edgerun/v1/{DEVICE}/cmd/reboot", Code.UNKNOWN),
        (signed(args={"x": 1}), TOPIC, Code.BAD_ARGS),
        (signed("logs", {"lines": 0}), f"edgerun/v1/{DEVICE}/cmd/logs", Code.BAD_ARGS),
        (signed("config.set", {"values": {"api.workers": 3}}), f"edgerun/v1/{DEVICE}/cmd/config.set", Code.NOT_TUNABLE),
        (signed("config.set", {"values": {"log_level": "loud"}}), f"edgerun/v1/{DEVICE}/cmd/config.set", Code.INVALID_VALUE),
        (signed("config.get", {"keys": ["nope.nothing"]}), f"edgerun/v1/{DEVICE}/cmd/config.get", Code.BAD_ARGS),
        (signed("infer", {}), f"edgerun/v1/{DEVICE}/cmd/infer", "request.malformed"),
        (signed("infer", {"model": "other", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}]}),
         f"edgerun/v1/{DEVICE}/cmd/infer", "model.not_found"),
    ]  # fmt: skip
    for body, topic, code in cases:
        reply = send(d, body, topic)
        assert reply["ok"] is False and reply["error"]["code"] == code, (body, reply)
        assert reply["error"]["message"]
    refused = {code for code, _ in setup.refusals}
    assert {
        Code.UNSIGNED,
        Code.BAD_SIGNATURE,
        Code.EXPIRED,
        Code.MISMATCH,
        Code.TOO_LARGE,
    } <= refused


def test_mqtt311_replies_go_to_reply_to(setup: Setup) -> None:
    d = setup.dispatcher()
    response = d.handle(Request(TOPIC, dumps(signed(id="v3", reply_to=REPLY))))
    assert response is not None and str(response.topic) == REPLY
    assert loads(response.payload)["id"] == "v3" and response.correlation_data is None
    # Nowhere to reply: nothing to publish, and no exception either.
    assert d.handle(Request(TOPIC, b"junk")) is None
    assert d.handle(Request(TOPIC, dumps(signed(reply_to="bad/#")))) is None


@pytest.mark.parametrize(
    "target",
    [
        f"edgerun/v1/{DEVICE}/telemetry",
        f"edgerun/v1/{DEVICE}/status",
        f"edgerun/v1/{DEVICE}/events",
        "edgerun/v1/dev-b/cmd/ping",
        "edgerun/v1/console/c1/reply/more",
        "edgerun/v1/console/+/reply",
        "edgerun/v1/console//reply",
        "$SYS/broker/x",
        "c/replies",
    ],
)
def test_replies_only_go_to_console_reply_topics(setup: Setup, target: str) -> None:
    """An unsigned (or any) command naming another topic is answered nowhere, with an
    event; the command itself does not run."""
    d = setup.dispatcher()
    before = len(setup.refusals)
    for request in (
        Request(TOPIC, dumps({"id": "r1", "name": "ping", "reply_to": target})),
        Request(TOPIC, dumps(signed(reply_to=target))),
        Request(TOPIC, dumps(signed()), target, b"c"),  # the MQTT v5 response topic
        Request(TOPIC, b"junk", target, b"c"),
    ):
        assert d.handle(request) is None
    codes = [code for code, _ in setup.refusals[before:]]
    assert codes.count(Code.BAD_REPLY_TOPIC) >= 3, codes


def test_a_repeated_id_gets_the_first_reply(setup: Setup) -> None:
    d = setup.dispatcher()
    body = signed(id="repeat-me")
    first = send(d, body)
    time.sleep(0.01)
    assert send(d, body) == first  # the cached reply, not a new "time"
    # An unsigned command cannot claim a cached id, nor plant a reply for one.
    unsigned = {"id": "repeat-me", "name": "ping", "to": DEVICE}
    assert send(d, unsigned)["error"]["code"] == Code.UNSIGNED
    # The same id on another body is refused, not answered with the first reply.
    other = signed(id="repeat-me", args={})
    assert other != body
    reused = send(d, other)
    assert reused["error"]["code"] == Code.ID_REUSED and "repeat-me" in reused["error"]["message"]
    assert send(d, body) == first


def test_an_id_outlives_its_reply_until_the_command_expires(tmp: Path, setup: Setup) -> None:
    """The count bound drops stored replies, never an unexpired id: a captured command
    cannot run again by pushing it out of the cache."""
    now = [time.time()]
    cache = ReplyCache(tmp / "r.sqlite", 2, 10.0, clock=lambda: now[0])
    d = Dispatcher(DEVICE, [], setup.table, [KEY.public_key()], True, 4096, cache,
                   lambda *a, **k: None, clock=lambda: now[0])  # fmt: skip
    captured = signed(id="captured", issued_at=now[0], expires_at=now[0] + 3000)
    assert send(d, captured)["ok"]
    for i in range(5):
        assert send(d, signed(id=f"later-{i}", issued_at=now[0], expires_at=now[0] + 3000))["ok"]
    assert send(d, captured)["error"]["code"] == Code.REPLAYED
    now[0] += 3000 + 61  # past expires_at and the clock skew: forgotten, and expired
    assert send(d, signed(id="new", issued_at=now[0], expires_at=now[0] + 60))["ok"]
    assert cache.get("captured") is None
    assert send(d, captured)["error"]["code"] == Code.EXPIRED
    cache.close()


def test_a_full_id_memory_refuses_instead_of_forgetting(tmp: Path, setup: Setup) -> None:
    cache = ReplyCache(tmp / "r.sqlite", 1, 10.0, max_ids=3)
    d = setup.dispatcher()
    d.cache = cache
    for i in range(3):
        assert send(d, signed(id=f"keep-{i}"))["ok"]
    busy = send(d, signed(id="one-more"))
    assert (
        busy["error"]["code"] == Code.BUSY and "commands.max_lifetime_s" in busy["error"]["message"]
    )
    cache.close()


def test_refusal_events_are_rate_limited() -> None:
    now = [0.0]
    emitted: list[tuple[str, dict[str, Any]]] = []
    report = RefusalReporter(
        lambda kind, reason, **data: emitted.append((reason, data)), 1.0, lambda: now[0]
    )
    for _ in range(5):
        report(Code.UNSIGNED, "unsigned")
    report(Code.MALFORMED, "junk")
    now[0] = 1.5
    report(Code.UNSIGNED, "unsigned")
    assert [(r, d["code"], d["suppressed"]) for r, d in emitted] == [
        ("unsigned", Code.UNSIGNED, 0), ("junk", Code.MALFORMED, 0), ("unsigned", Code.UNSIGNED, 4),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)  # fmt: skip
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_arbitrary_bytes(setup: Setup, payload: bytes) -> None:
    reply = send(setup.dispatcher(), payload)
    assert reply["ok"] is False and reply["error"]["code"] in EXPECTED


@FUZZ
@given(value=json_values, topic=st.sampled_from([TOPIC, "edgerun/v1/group/lab/cmd/logs", "x"]))
def test_arbitrary_json(setup: Setup, value: Any, topic: str) -> None:
    reply = send(setup.dispatcher(), json.dumps(value).encode(), topic)
    assert reply["ok"] is False and reply["error"]["code"] in EXPECTED


ARG_NAMES = ["values", "lines", "level", "keys", "inputs", "outputs", "model", "x"]


@FUZZ
@given(
    name=st.sampled_from(["ping", "status", "config.get", "config.set", "infer", "logs"]),
    args=st.dictionaries(st.sampled_from(ARG_NAMES), json_values, max_size=3),
    extra=st.dictionaries(
        st.sampled_from(["issued_at", "expires_at", "to", "reply_to"]), json_values, max_size=2
    ),
)
def test_arbitrary_arguments_to_every_command(
    setup: Setup, name: str, args: dict[str, Any], extra: dict[str, Any]
) -> None:
    body = {"id": f"f-{time.monotonic_ns()}", "name": name, "args": args, **extra}
    reply = send(setup.dispatcher(signed=False), body, f"edgerun/v1/{DEVICE}/cmd/{name}")
    assert reply["ok"] or reply["error"]["code"] in EXPECTED, reply
    assert setup.agent.host.ready()


@FUZZ
@given(
    mutation=st.dictionaries(
        st.sampled_from(["id", "name", "args", "sig", "to", "expires_at"]),
        json_values,
        min_size=1,
        max_size=2,
    )
)
def test_mutated_signed_commands_are_refused(setup: Setup, mutation: dict[str, Any]) -> None:
    body = signed(id="base")
    changed = {**body, **mutation}
    if changed == body:
        return
    reply = send(setup.dispatcher(), changed)
    if reply["ok"]:  # only possible if the mutation left the signed fields equal
        assert all(body.get(k) == v for k, v in mutation.items() if k != "sig")
    else:
        assert reply["error"]["code"] in EXPECTED


def test_runtime_tunables_reach_the_running_agent(tmp: Path) -> None:
    s = Setup(tmp)
    try:
        d = s.dispatcher(signed=False)
        topic = f"edgerun/v1/{DEVICE}/cmd/config.set"
        infer_topic = f"edgerun/v1/{DEVICE}/cmd/infer"
        request = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}
            ]
        }
        before = s.agent.host.model
        reply = send(d, {"id": "t1", "name": "config.set",
                         "args": {"values": {"runtimes.onnxruntime.intra_op_threads": 1}}}, topic)  # fmt: skip
        assert reply["ok"], reply
        after = s.agent.host.model
        assert after is not before and after.runtime.describe()["intra_op_threads"] == 1
        assert s.agent.admission.config.runtimes.onnxruntime.intra_op_threads == 1
        assert s.agent.events.recent[-1].kind == "model.reloaded"
        assert send(d, {"id": "i1", "name": "infer", "args": request}, infer_topic)["ok"]
        # A soft limit below the agent's RSS sheds requests at once; 0 restores the default.
        reply = send(d, {"id": "t2", "name": "config.set",
                         "args": {"values": {"memory.soft_limit_mb": 1}}}, topic)  # fmt: skip
        assert reply["ok"] and s.agent.watcher.overloaded
        shed = send(d, {"id": "i2", "name": "infer", "args": request}, infer_topic)
        assert shed["error"]["code"] == "overloaded"
        assert send(d, {"id": "t3", "name": "config.set",
                        "args": {"values": {"memory.soft_limit_mb": 0}}}, topic)["ok"]  # fmt: skip
        assert not s.agent.watcher.overloaded
        assert send(d, {"id": "i3", "name": "infer", "args": request}, infer_topic)["ok"]
        # All or nothing: one bad value and nothing changes.
        reply = send(d, {"id": "t4", "name": "config.set", "args": {"values": {
            "log_level": "error", "telemetry.interval_s": 0}}}, topic)  # fmt: skip
        assert reply["error"]["code"] == Code.INVALID_VALUE
        assert "telemetry.interval_s" in reply["error"]["message"]
        got = send(
            d, {"id": "g1", "name": "config.get", "args": {}}, f"edgerun/v1/{DEVICE}/cmd/config.get"
        )
        assert got["result"]["tunable"]["log_level"] == "info"
        assert got["result"]["config"]["runtimes"]["onnxruntime"]["intra_op_threads"] == 1
    finally:
        s.agent.host.close()


def test_every_readable_key_reads_and_nothing_else_does(setup: Setup) -> None:
    config = setup.agent.config
    everything = read_all(config)  # a key in READABLE that does not exist would raise here
    assert everything["mqtt"]["port"] == config.mqtt.port
    assert "password" not in everything.get("mqtt", {}) and "state_dir" not in everything
    for key in ["__class__", "mqtt.__class__", "state_dir", "mqtt.password", "trust.public_keys",
                "memory.__dataclass_fields__", "mqtt.groups.append", "", "mqtt..port"]:  # fmt: skip
        with pytest.raises(UnreadableKeyError):
            read(config, key)


def test_replies_from_the_cache_before_digests_still_answer(tmp: Path, setup: Setup) -> None:
    path = tmp / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE replies (id TEXT PRIMARY KEY, body BLOB NOT NULL, created REAL)")
    old = {"id": "before-upgrade", "ok": True, "result": {"pong": True}}
    db.execute("INSERT INTO replies VALUES (?, ?, ?)", ("before-upgrade", dumps(old), time.time()))
    db.commit()
    db.close()
    d = setup.dispatcher()
    d.cache = ReplyCache(path, 10, 3600)
    assert send(d, signed(id="before-upgrade"))["result"] == {"pong": True}
    d.cache.close()


def test_a_lone_surrogate_is_refused_and_its_refusal_event_can_be_sent(setup: Setup) -> None:
    d = setup.dispatcher()
    before = len(setup.refusals)
    payload = b'{"id": "x\\ud800", "name": "ping", "to": "dev-a", "args": {"k": "\\udfff"}}'
    reply = send(d, payload)
    assert reply["error"]["code"] == Code.MALFORMED and "surrogate" in reply["error"]["message"]
    code, message = setup.refusals[before]
    assert code == Code.MALFORMED
    dumps({"reason": message})  # what the outbox does with the event: must not raise


def test_a_result_that_is_not_json_becomes_an_error_reply(tmp: Path, setup: Setup) -> None:
    table = {**setup.table, "nan": CommandSpec("nan", "a NaN result", (), lambda a: math.nan)}
    d = Dispatcher(DEVICE, [], table, [KEY.public_key()], True, 4096,
                   ReplyCache(tmp / "r.sqlite", 10, 60), lambda *a, **k: None)  # fmt: skip
    body = signed("nan", id="nan-1")
    topic = f"edgerun/v1/{DEVICE}/cmd/nan"
    reply = send(d, body, topic)
    assert reply["error"]["code"] == Code.FAILED and "not JSON" in reply["error"]["message"]
    assert send(d, body, topic) == reply  # and that is what a repeat gets
