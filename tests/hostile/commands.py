"""Hostile MQTT commands (issue 7, section 6): generated here, judged by the real parts.

Two runs:

* every case through the real dispatcher in this process (a real Agent serving the
  sample model, the real command table, reply cache on disk, signatures required): the
  code comes from the reply, or from the refusal event when the command is answered
  nowhere (a forbidden reply topic);
* a representative subset, and every forbidden reply topic, published to a real
  agent process (`python -m agent.cli run`) through a real mosquitto, with a
  privileged client subscribed to `#` and `$hw/#`: nothing may appear anywhere but
  the console's reply topic and the device's own status/state/telemetry/events
  (and no reply-shaped body on those). Forbidden reply topics get no reply at all;
  they are judged by their `command.refused` events, whose `suppressed` count must
  account for every one of them (the events are rate limited per code).

Afterwards the agent must still answer a ping and serve inference.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.loader import parse_config
from agent.link.commands import Dispatcher, Request
from agent.link.handlers import build_table
from agent.link.logring import LogRing
from agent.link.replies import ReplyCache
from agent.link.tunables import Tunables
from agent.protocol.canonical import sign_body
from agent.protocol.messages import Code, dumps
from agent.service import Agent
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, running_agent, samples
from tests.hostile import Case, Outcome
from tests.mqtt_broker import Broker, Listener

CLASSES = (
    "command.shape",
    "command.binding",
    "command.signature",
    "command.replay",
    "command.reply_topic",
    "command.config",
    "command.dispatch",
)
DEVICE = "hostile-dev"
GROUP = "lab"
ROOT = f"edgerun/v1/{DEVICE}"
CONSOLE_REPLY = "edgerun/v1/console/hostile/reply"
KEY = Ed25519PrivateKey.generate()
MB = 1024 * 1024


def cmd_topic(name: str, device: str = DEVICE) -> str:
    return f"edgerun/v1/{device}/cmd/{name}"


def body(name: str = "ping", args: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A well-formed, signed-to-be command; a field given as None is left out."""
    now = time.time()
    base: dict[str, Any] = {"id": uuid.uuid4().hex, "name": name, "args": args or {},
                            "to": DEVICE, "issued_at": now, "expires_at": now + 60}  # fmt: skip
    return {k: v for k, v in {**base, **fields}.items() if v is not None}


def signed(name: str = "ping", args: dict[str, Any] | None = None, **fields: Any) -> bytes:
    return raw(sign_body(body(name, args, **fields), KEY))


def raw(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _sig(data: bytes) -> str:
    return base64.b64encode(KEY.sign(data)).decode("ascii")


@dataclass(frozen=True)
class Hostile:
    case: Case
    topic: str
    payload: bytes
    response_topic: str | None = CONSOLE_REPLY
    broker: bool = False  # also sent through the real broker to the agent process


def _c(klass: str, name: str, expect: str | tuple[str, ...], note: str = "") -> Case:
    return Case(klass, name, (expect,) if isinstance(expect, str) else expect, note)


def shape_cases() -> list[Hostile]:
    k, m, t = "command.shape", Code.MALFORMED, cmd_topic("ping")
    items: list[tuple[str, bytes, str | tuple[str, ...]]] = [
        ("not-json", b"ping please", m),
        ("truncated-json", signed()[:-5], m),
        ("json-array", b"[1, 2]", m),
        ("json-string", b'"ping"', m),
        ("json-null", b"null", m),
        ("invalid-utf8", b'{"id": "\xff\xfe", "name": "ping"}', m),
        ("nan", raw(body(args={"x": 1})).replace(b'"x": 1', b'"x": NaN'), m),
        ("overflowing-float", raw(body()).replace(b'"expires_at": ', b'"expires_at": 1e999, "_": '), m),
        ("duplicate-key", b'{"id": "a", "id": "b", "name": "ping"}', m),
        ("deep-nesting", b'{"id": "d", "name": "ping", "args": {"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}", (m, Code.TOO_LARGE)),
        ("nesting-under-the-parser-limit", b'{"id": "n", "name": "ping", "args": {"x": ' + b"[" * 985 + b"]" * 985 + b"}}", m),
        ("nesting-past-max-depth", raw({**body(), "args": {"x": json.loads("[" * 70 + "]" * 70)}}), m),
        ("oversized", raw(body(args={"pad": "x" * 70_000})), Code.TOO_LARGE),
        ("huge-integer-expiry", raw({**body(), "expires_at": 10**400}), m),
        ("negative-expiry", raw({**body(), "expires_at": -5}), m),
        ("bool-issued-at", raw({**body(), "issued_at": True}), m),
        ("string-expiry", raw({**body(), "expires_at": "tomorrow"}), m),
        ("id-missing", raw(body(id=None)), m),
        ("id-integer", raw({**body(), "id": 7}), m),
        ("id-list", raw({**body(), "id": ["a"]}), m),
        ("id-empty", raw({**body(), "id": ""}), m),
        ("id-too-long", raw({**body(), "id": "i" * 129}), m),
        ("id-with-space", raw({**body(), "id": "a b"}), m),
        ("id-control-char", raw({**body(), "id": "a\u0007b"}), m),
        ("id-non-ascii", raw({**body(), "id": "caf\u00e9"}), m),
        ("id-zero-width", raw({**body(), "id": "ab\u200dcd"}), m),
        ("id-rtl-override", raw({**body(), "id": "abc\u202edcb"}), m),
        ("id-lone-surrogate", raw(body()).replace(b'"id": "', b'"id": "\\ud800', 1), m),
        ("args-lone-surrogate", raw(body(args={"v": "\\udfff"})).replace(b"\\\\udfff", b"\\udfff"), m),
        ("key-lone-surrogate", b'{"id": "k", "name": "ping", "\\ud83d": 1}', m),
        ("name-upper", raw({**body(), "name": "PING"}), (m, Code.MISMATCH)),
        ("name-homoglyph", raw({**body(), "name": "p\u0456ng"}), m),
        ("name-integer", raw({**body(), "name": 1}), m),
        ("name-too-long", raw({**body(), "name": "a" * 65}), m),
        ("args-list", raw({**body(), "args": [1]}), m),
        ("args-string", raw({**body(), "args": "x"}), m),
        ("unknown-field", raw({**body(), "admin": True}), m),
        ("to-integer", raw({**body(), "to": 5}), m),
        ("to-slash", raw({**body(), "to": f"{DEVICE}/x"}), m),
        ("to-fullwidth", raw({**body(), "to": "hostile\uff0ddev"}), m),
        ("to-empty-group", raw({**body(), "to": "group:"}), m),
        ("sig-integer", raw({**body(), "sig": 12}), (m, Code.BAD_SIGNATURE)),
    ]  # fmt: skip
    broker = {"not-json", "invalid-utf8", "id-lone-surrogate", "oversized", "deep-nesting",
              "nesting-under-the-parser-limit"}  # fmt: skip
    return [Hostile(_c(k, n, e), t, p, broker=n in broker) for n, p, e in items]


def binding_cases() -> list[Hostile]:
    k = "command.binding"
    now = time.time()
    t = cmd_topic("ping")
    items: list[tuple[str, str, bytes, str]] = [
        ("no-to", t, signed(to=None), Code.NO_TARGET),
        ("to-other-device", t, signed(to="other-dev"), Code.WRONG_TARGET),
        ("to-group-on-device-topic", t, signed(to=f"group:{GROUP}"), Code.WRONG_TARGET),
        ("topic-other-device", cmd_topic("ping", "other-dev"), signed(to="other-dev"), Code.WRONG_TARGET),
        ("group-not-a-member", "edgerun/v1/group/strangers/cmd/ping", signed(to="group:strangers"), Code.WRONG_TARGET),
        ("group-topic-to-device", f"edgerun/v1/group/{GROUP}/cmd/ping", signed(), Code.WRONG_TARGET),
        ("topic-name-mismatch", t, signed("logs"), Code.MISMATCH),
        ("not-a-command-topic", f"{ROOT}/telemetry", signed(), Code.MISMATCH),
        ("no-expiry", t, signed(expires_at=None), Code.NO_EXPIRY),
        ("no-expiry-no-issued", t, signed(expires_at=None, issued_at=None), Code.NO_EXPIRY),
        ("lifetime-a-day", t, signed(expires_at=now + 86_400), Code.LIFETIME_TOO_LONG),
        ("lifetime-forever", t, signed(issued_at=None, expires_at=9e10), Code.LIFETIME_TOO_LONG),
        ("old-issued-long-life", t, signed(issued_at=now - 86_400, expires_at=now + 60), Code.LIFETIME_TOO_LONG),
        ("issued-in-future", t, signed(issued_at=now + 3600, expires_at=now + 3700), Code.FROM_THE_FUTURE),
        ("expired", t, signed(issued_at=now - 120, expires_at=now - 60), Code.EXPIRED),
        ("expired-at-epoch", t, signed(issued_at=0, expires_at=0), Code.EXPIRED),
    ]  # fmt: skip
    broker = {
        "no-to",
        "to-other-device",
        "no-expiry",
        "lifetime-a-day",
        "issued-in-future",
        "expired",
    }
    return [Hostile(_c(k, n, e), tp, p, broker=n in broker) for n, tp, p, e in items]


def signature_cases() -> list[Hostile]:
    k, t = "command.signature", cmd_topic("config.set")
    args = {"values": {"log_level": "debug"}}
    good = sign_body(body("config.set", args), KEY)
    stranger = sign_body(body("config.set", args), Ed25519PrivateKey.generate())
    tampered_args = {**good, "args": {"values": {"log_level": "error"}}}
    retargeted = sign_body(body("config.set", args, to="other-dev"), KEY)
    retargeted = {**retargeted, "to": DEVICE}
    longer = {**good, "expires_at": good["expires_at"] + 30}
    # Signed over other serialisations of the same body: not the canonical form.
    plain = body("config.set", {"values": {"log_level": "debug"}, "note": "caf\u00e9"})
    spaced = {**plain, "sig": _sig(json.dumps(plain, sort_keys=True).encode())}
    escaped = {
        **plain,
        "sig": _sig(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()),
    }
    unsorted = {
        **plain,
        "sig": _sig(json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode()),
    }
    with_sig = {**plain, "sig": ""}
    with_sig["sig"] = _sig(
        json.dumps({**plain, "sig": ""}, sort_keys=True, separators=(",", ":")).encode()
    )
    bad = Code.BAD_SIGNATURE
    items: list[tuple[str, bytes, str | tuple[str, ...]]] = [
        ("unsigned", raw(body("config.set", args)), Code.UNSIGNED),
        ("by-untrusted-key", raw(stranger), bad),
        ("tampered-args", raw(tampered_args), bad),
        ("retargeted-after-signing", raw(retargeted), bad),
        ("lifetime-extended-after-signing", raw(longer), bad),
        ("sig-not-base64", raw({**good, "sig": "!!!not base64!!!"}), bad),
        ("sig-short", raw({**good, "sig": base64.b64encode(b"x" * 10).decode()}), bad),
        ("sig-non-ascii", raw({**good, "sig": "\u00e9" * 88}), bad),
        ("sig-zeros", raw({**good, "sig": base64.b64encode(bytes(64)).decode()}), bad),
        ("signed-with-spaces", raw(spaced), bad),
        ("signed-ascii-escaped", raw(escaped), bad),
        ("signed-unsorted", raw(unsorted), bad),
        ("signed-including-sig-field", raw(with_sig), bad),
    ]  # fmt: skip
    broker = {"unsigned", "by-untrusted-key", "retargeted-after-signing", "signed-ascii-escaped"}
    return [Hostile(_c(k, n, e), t, p, broker=n in broker) for n, p, e in items]


def reply_topic_cases() -> list[Hostile]:
    """Each forbidden topic once as the body's reply_to (MQTT 3.1.1 style) and, for a
    few, as the MQTT v5 response topic."""
    k, t = "command.reply_topic", cmd_topic("ping")
    forbidden = [
        ("own-telemetry", f"{ROOT}/telemetry"),
        ("own-status", f"{ROOT}/status"),
        ("own-state", f"{ROOT}/state"),
        ("own-events", f"{ROOT}/events"),
        ("own-command", f"{ROOT}/cmd/config.set"),
        ("other-device-command", "edgerun/v1/other-dev/cmd/config.set"),
        ("group-command", f"edgerun/v1/group/{GROUP}/cmd/ping"),
        ("twin-update", f"$hw/events/device/default/{DEVICE}/twin/update"),
        ("sys-topic", "$SYS/broker/hostile"),
        ("wildcard-hash", "edgerun/v1/console/#"),
        ("wildcard-plus", "edgerun/v1/console/+/reply"),
        ("reply-extra-level", "edgerun/v1/console/hostile/reply/x"),
        ("console-empty-id", "edgerun/v1/console//reply"),
        ("console-dotdot", "edgerun/v1/console/../reply"),
        ("console-unicode-id", "edgerun/v1/console/h\u00f6stile/reply"),
        ("other-root", "someone/else/reply"),
        ("long-topic", "edgerun/v1/console/" + "x" * 60_000 + "/reply"),
        ("nul-in-topic", "edgerun/v1/console/a\u0000b/reply"),
    ]
    broker = {n for n, _ in forbidden} - {"long-topic", "nul-in-topic", "sys-topic"}
    out: list[Hostile] = []
    for name, topic in forbidden:
        out.append(Hostile(_c(k, f"reply-to-{name}", Code.BAD_REPLY_TOPIC),
                           t, raw({**body(), "reply_to": topic}), None, name in broker))  # fmt: skip
    # Unsigned, so anyone could send it: the issue's own example.
    out.append(Hostile(_c(k, "unsigned-reply-to-own-telemetry", Code.BAD_REPLY_TOPIC),
                       t, raw({"id": "u-r", "name": "ping", "reply_to": f"{ROOT}/telemetry"}), None, True))  # fmt: skip
    for name, topic in forbidden[:3] + forbidden[5:6]:
        out.append(Hostile(_c(k, f"response-topic-{name}", Code.BAD_REPLY_TOPIC), t, signed(), topic,
                           name in ("own-telemetry", "other-device-command")))  # fmt: skip
    return out


def config_cases() -> list[Hostile]:
    k = "command.config"
    get, put = cmd_topic("config.get"), cmd_topic("config.set")
    bad_args, not_tunable, invalid = Code.BAD_ARGS, Code.NOT_TUNABLE, Code.INVALID_VALUE
    gets: list[tuple[str, Any, str | tuple[str, ...]]] = [
        ("dunder-class", ["__class__"], bad_args),
        ("dunder-path", ["mqtt.__class__.__init__"], bad_args),
        ("dataclass-fields", ["memory.__dataclass_fields__"], bad_args),
        ("secret-password", ["mqtt.password"], bad_args),
        ("secret-console-keys", ["commands.console_keys"], bad_args),
        ("trust-keys", ["trust.public_keys"], bad_args),
        ("tls-key-file", ["mqtt.tls.key_file"], bad_args),
        ("state-dir", ["state_dir"], bad_args),
        ("method-name", ["mqtt.groups.append"], bad_args),
        ("empty-key", [""], bad_args),
        ("integer-key", [1], bad_args),
        ("keys-not-list", "mqtt.port", bad_args),
        ("too-many-keys", ["mqtt.port"] * 500, bad_args),
    ]
    sets: list[tuple[str, Any, str | tuple[str, ...]]] = [
        ("not-tunable-host", {"mqtt.host": "evil.example"}, not_tunable),
        ("not-tunable-signatures", {"commands.require_signature": False}, not_tunable),
        ("not-tunable-dunder", {"__class__": 1}, not_tunable),
        ("not-tunable-long-key", {"k" * 5000: 1}, not_tunable),
        ("interval-negative", {"telemetry.interval_s": -1}, invalid),
        ("interval-zero", {"telemetry.interval_s": 0}, invalid),
        ("interval-huge", {"telemetry.interval_s": 1e300}, invalid),
        ("interval-string", {"telemetry.interval_s": "fast"}, invalid),
        ("interval-bool", {"telemetry.interval_s": True}, invalid),
        ("interval-list", {"telemetry.interval_s": [1]}, invalid),
        ("log-level-unknown", {"log_level": "LOUD"}, invalid),
        ("log-level-integer", {"log_level": 5}, invalid),
        ("soft-limit-negative", {"memory.soft_limit_mb": -1}, invalid),
        ("threads-huge", {"runtimes.onnxruntime.intra_op_threads": 10**30}, invalid),
        ("threads-fraction", {"runtimes.onnxruntime.intra_op_threads": 1.5}, invalid),
        ("one-bad-among-good", {"log_level": "debug", "telemetry.interval_s": -1}, invalid),
        ("values-empty", {}, bad_args),
        ("values-not-object", [["log_level", "debug"]], bad_args),
    ]
    out = [
        Hostile(_c(k, f"get-{n}", e), get, signed("config.get", {"keys": v})) for n, v, e in gets
    ]
    out += [
        Hostile(_c(k, f"set-{n}", e), put, signed("config.set", {"values": v})) for n, v, e in sets
    ]
    out.append(Hostile(_c(k, "set-nan", Code.MALFORMED), put,
                       raw(body("config.set", {"values": {"telemetry.interval_s": 1}})).replace(b": 1}", b": NaN}")))  # fmt: skip
    broker = {
        "get-dunder-class",
        "get-secret-password",
        "set-not-tunable-host",
        "set-interval-negative",
        "set-nan",
    }
    return [
        Hostile(h.case, h.topic, h.payload, h.response_topic, h.case.name in broker) for h in out
    ]


def dispatch_cases() -> list[Hostile]:
    k = "command.dispatch"
    return [
        Hostile(_c(k, "unknown-command", Code.UNKNOWN), cmd_topic("reboot"), signed("reboot")),
        Hostile(_c(k, "unknown-argument", Code.BAD_ARGS), cmd_topic("ping"), signed(args={"x": 1}), broker=True),
        Hostile(_c(k, "logs-lines-string", Code.BAD_ARGS), cmd_topic("logs"), signed("logs", {"lines": "all"})),
        Hostile(_c(k, "logs-lines-huge", Code.BAD_ARGS), cmd_topic("logs"), signed("logs", {"lines": 10**12})),
        Hostile(_c(k, "logs-level-unknown", Code.BAD_ARGS), cmd_topic("logs"), signed("logs", {"level": "trace"})),
        Hostile(_c(k, "infer-no-inputs", "request.malformed"), cmd_topic("infer"), signed("infer", {})),
        Hostile(_c(k, "infer-wrong-shape", "input.mismatch"), cmd_topic("infer"),
                signed("infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}), broker=True),
        Hostile(_c(k, "infer-huge-shape", ("request.malformed", "input.mismatch", "request.too_large")), cmd_topic("infer"),
                signed("infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [10**9, 10**9], "data": [1]}]})),
        Hostile(_c(k, "infer-unknown-model", "model.not_found"), cmd_topic("infer"),
                signed("infer", {"model": "other", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}]})),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- replay


def replay_cases(clock: list[float]) -> list[tuple[Hostile, Callable[[Dispatcher], None]]]:
    """Cases that need history: `setup` runs first (and must succeed), then the case."""
    k, t = "command.replay", cmd_topic("config.set")
    now = clock[0]
    first = sign_body(body("config.set", {"values": {"log_level": "info"}}, issued_at=now, expires_at=now + 300), KEY)  # fmt: skip
    reused = sign_body({**first, "args": {"values": {"log_level": "debug"}}}, KEY)
    moved = sign_body({**first, "reply_to": CONSOLE_REPLY}, KEY)
    pushed = sign_body(body("ping", issued_at=now, expires_at=now + 300), KEY)
    old = sign_body(body("ping", issued_at=now, expires_at=now + 30), KEY)
    other = sign_body(body("ping", to="other-dev", issued_at=now, expires_at=now + 300), KEY)

    def run_first(d: Dispatcher, b: dict[str, Any] = first, topic: str = t) -> None:
        response = d.handle(Request(topic, raw(b), CONSOLE_REPLY, b"setup"))
        assert response is not None and response.reply.ok, response

    def push_out(d: Dispatcher) -> None:
        run_first(d, pushed, cmd_topic("ping"))
        for _ in range(d.cache.max_entries + 2):  # newer replies push its reply out
            run_first(
                d,
                sign_body(body("ping", issued_at=now, expires_at=now + 300), KEY),
                cmd_topic("ping"),
            )

    def expire(d: Dispatcher) -> None:
        run_first(d, old, cmd_topic("ping"))
        # Past its expiry, the clock-skew allowance and the reply cache's age (within
        # that age a repeat gets the first reply again: idempotent, not run).
        clock[0] += 30 + 120 + 600

    return [
        (Hostile(_c(k, "same-id-other-args", Code.ID_REUSED), t, raw(reused)), run_first),
        (Hostile(_c(k, "same-id-other-reply-to", Code.ID_REUSED), t, raw(moved), None), run_first),
        (Hostile(_c(k, "replay-after-reply-left-cache", Code.REPLAYED), cmd_topic("ping"), raw(pushed)), push_out),
        (Hostile(_c(k, "replay-after-expiry", Code.EXPIRED), cmd_topic("ping"), raw(old)), expire),
        (Hostile(_c(k, "captured-for-another-device", Code.WRONG_TARGET), cmd_topic("ping"), raw(other)), lambda d: None),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- in process


class InProcess:
    """The real dispatcher over a real Agent; refusals recorded as the link's events."""

    def __init__(self, workdir: Path) -> None:
        config = parse_config(
            {"device_id": DEVICE, "state_dir": str(workdir / "state"), "api": {"socket": None},
             "trust": {"public_keys": [str(DEMO_PUB)]}, "model": {"bundle": str(SAMPLE_BUNDLE)},
             "mqtt": {"groups": [GROUP]}},
            environ={},
        )  # fmt: skip
        self.agent = Agent(config)
        self.agent.load_initial_model()
        self.table = build_table(self.agent, Tunables(self.agent), LogRing(50), dict)
        self.workdir = workdir
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.process = psutil.Process()

    def report(self, code: str, message: str, **data: Any) -> None:
        # As the outbox would: an event that cannot be encoded is lost, so fail here.
        dumps({"code": code, "message": message, **data})
        self.events.append((code, message, data))

    def dispatcher(self, name: str, clock: Callable[[], float] = time.time) -> Dispatcher:
        cache = ReplyCache(self.workdir / f"replies-{name}.sqlite", 3, 600.0, clock=clock)
        return Dispatcher(DEVICE, [GROUP], self.table, [KEY.public_key()], True, 64 * 1024,
                          cache, self.report, clock=clock)  # fmt: skip

    def judge(self, d: Dispatcher, h: Hostile) -> Outcome:
        before = len(self.events)
        start = time.perf_counter()
        try:
            response = d.handle(Request(h.topic, h.payload, h.response_topic, b"corr"))
        except Exception as exc:  # the dispatcher's contract: nothing escapes
            return Outcome(h.case, None, f"escaped: {exc!r}", time.perf_counter() - start)
        seconds = time.perf_counter() - start
        rss = self.process.memory_info().rss / MB
        if response is not None:
            if str(response.topic) != CONSOLE_REPLY:
                return Outcome(h.case, None, f"replied on {response.topic!r}", seconds, rss)
            error = response.reply.error
            json.loads(response.payload)
            if error is None:
                return Outcome(h.case, None, "accepted", seconds, rss)
            return Outcome(h.case, error.code, error.message, seconds, rss)
        events = self.events[before:]
        if not events:
            return Outcome(h.case, None, "no reply and no refusal event", seconds, rss)
        code, message, _ = events[-1]
        return Outcome(h.case, code, message, seconds, rss)

    def close(self) -> None:
        self.agent.host.close()


def all_cases() -> list[Hostile]:
    return (
        shape_cases() + binding_cases() + signature_cases() + reply_topic_cases()
        + config_cases() + dispatch_cases()
    )  # fmt: skip


def run_in_process(workdir: Path) -> list[Outcome]:
    judge = InProcess(workdir)
    try:
        d = judge.dispatcher("plain")
        outcomes = [judge.judge(d, h) for h in all_cases()]
        for i, (h, setup) in enumerate(replay_cases(clock := [time.time()])):
            clock[0] = time.time()
            d = judge.dispatcher(f"replay-{i}", clock=lambda: clock[0])
            setup(d)
            outcomes.append(judge.judge(d, h))
        assert judge.agent.host.ready()
        return outcomes
    finally:
        judge.close()


# ----------------------------------------------------------------------------- broker


class Watch:
    """Everything published anywhere on the broker, seen by a privileged client."""

    def __init__(self, broker: Broker) -> None:
        self.listener = Listener(broker, ["#", "$hw/#", "$SYS/broker/hostile"])

    def leaks(self, sent: list[tuple[str, bytes]]) -> list[str]:
        """Messages that are neither ours nor a device stream nor a console reply."""
        ours = list(sent)
        streams = {f"{ROOT}/{s}" for s in ("status", "state", "telemetry", "events")}
        found = []
        with self.listener._cond:
            seen = list(self.listener.messages)
        for topic, payload, _, _ in seen:
            if (topic, payload) in ours:
                ours.remove((topic, payload))
                continue
            if topic == CONSOLE_REPLY:
                continue
            if topic in streams:
                try:
                    parsed = json.loads(payload)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict) and "ok" not in parsed:
                    continue
            found.append(f"{topic}: {payload[:120]!r}")
        return found


class Console:
    def __init__(self, broker: Broker) -> None:
        self.listener = Listener(broker, [CONSOLE_REPLY])
        self.sent: list[tuple[str, bytes]] = []

    def send(self, topic: str, payload: bytes, response_topic: str | None) -> bytes:
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic is not None:
            props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        self.sent.append((topic, payload))
        info = self.listener.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(10)
        return correlation

    def reply(self, correlation: bytes, timeout: float) -> dict[str, Any] | None:
        found: list[dict[str, Any]] = []

        def match(listener: Listener) -> bool:
            for _, payload, _, props in listener.messages:
                if getattr(props, "CorrelationData", None) == correlation:
                    found.append(json.loads(payload))
                    return True
            return False

        self.listener.wait_for(match, timeout)
        return found[0] if found else None


def _agent_toml(workdir: Path, port: int, console_pub: Path) -> str:
    return "\n".join([
        f'device_id = "{DEVICE}"',
        f'state_dir = "{workdir / "state"}"',
        "[trust]", f'public_keys = ["{DEMO_PUB}"]',
        "[api]", f'socket = "{workdir / "api.sock"}"',
        "[model]", f'bundle = "{SAMPLE_BUNDLE}"',
        "[mqtt]", "enabled = true", f"port = {port}", f'groups = ["{GROUP}"]',
        "reconnect_min_s = 0.05", "reconnect_max_s = 0.5",
        "[telemetry]", "interval_s = 3600.0",
        "[commands]", f'console_keys = ["{console_pub}"]',
    ]) + "\n"  # fmt: skip


def run_through_broker(workdir: Path, cases: list[Hostile]) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    pub = workdir / "console.pub"
    pub.write_bytes(KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    outcomes: list[Outcome] = []
    with Broker(workdir) as broker:
        watch = Watch(broker)
        events = Listener(broker, [f"{ROOT}/events"])
        console = Console(broker)
        try:
            with running_agent(workdir, _agent_toml(workdir, broker.port, pub)) as agent:
                device = psutil.Process(agent.proc.pid)
                # "online" is published once the device's command subscriptions stand.
                assert watch.listener.wait_for(lambda f: any(
                    json.loads(p).get("state") == "online" for p in f.on(f"{ROOT}/status")), 60
                ), agent.output()[-2000:]  # fmt: skip
                ping = console.send(cmd_topic("ping"), signed(), CONSOLE_REPLY)
                first = console.reply(ping, 30)
                assert first is not None and first["ok"], first
                silent = [h for h in cases if h.case.expect == (Code.BAD_REPLY_TOPIC,)]
                answered = [h for h in cases if h not in silent]
                for h in map(_through_broker, answered):
                    start = time.perf_counter()
                    correlation = console.send(h.topic, h.payload, h.response_topic)
                    reply = console.reply(correlation, 10)
                    seconds = time.perf_counter() - start
                    rss = device.memory_info().rss / MB
                    if reply is None:
                        outcomes.append(Outcome(h.case, None, "no reply", seconds, rss))
                    elif reply["ok"]:
                        outcomes.append(Outcome(h.case, None, "accepted", seconds, rss))
                    else:
                        error = reply["error"]
                        outcomes.append(
                            Outcome(h.case, error["code"], error["message"], seconds, rss)
                        )
                outcomes += _judge_silent(console, events, silent, device)
                # The device still answers and still serves its model.
                assert (
                    again := console.reply(
                        console.send(cmd_topic("ping"), signed(), CONSOLE_REPLY), 10
                    )
                ), "no ping"
                assert again["ok"]
                with agent.client() as api:  # the previous model, as before the corpus
                    inputs, labels = samples()
                    scores = api.infer("digits", {"input": inputs[:4]})["logits"]
                    assert list(scores.argmax(axis=1)) == list(labels[:4])
                time.sleep(0.3)  # let anything stray arrive at the watcher
        finally:
            leaks = watch.leaks(console.sent)
            for listener in (watch.listener, events, console.listener):
                listener.close()
    case = Case("command.reply_topic", "broker-nothing-published-outside-reply-topics",
                (Code.BAD_REPLY_TOPIC,))  # fmt: skip
    message = "; ".join(leaks) if leaks else "every message was on a reply topic or a device stream"
    outcomes.append(Outcome(case, None if leaks else Code.BAD_REPLY_TOPIC, message))
    return outcomes


def _judge_silent(
    console: Console, events: Listener, silent: list[Hostile], device: psutil.Process
) -> list[Outcome]:
    """Forbidden reply topics: no reply anywhere (checked by the watcher) and one
    refusal each, counted through the rate-limited events: the first event plus the
    `suppressed` count of a closing one must equal the cases sent."""

    def refused() -> list[dict[str, Any]]:
        out = []
        for payload in events.on("/events"):
            event = json.loads(payload)  # a reply published here is the watcher's to report
            data = event.get("data") if event.get("kind") == "command.refused" else None
            if isinstance(data, dict) and data.get("code") == Code.BAD_REPLY_TOPIC:
                out.append(event)
        return out

    time.sleep(1.1)  # a fresh rate-limit window for this code
    before = len(refused())
    start = time.perf_counter()
    for h in silent:
        console.send(h.topic, h.payload, h.response_topic)
    events.wait_for(lambda f: len(refused()) > before, 10)
    seconds = (time.perf_counter() - start) / max(len(silent), 1)
    time.sleep(1.1)
    closing = raw({**body(), "reply_to": f"{ROOT}/status"})
    console.send(cmd_topic("ping"), closing, None)
    events.wait_for(lambda f: len(refused()) >= before + 2, 10)
    got = refused()[before:]
    rss = device.memory_info().rss / MB
    counted = 1 + int(got[1]["data"]["suppressed"]) if len(got) >= 2 else len(got)
    outcomes = []
    for case in (_through_broker(h).case for h in silent):
        if counted == len(silent):
            outcomes.append(Outcome(case, Code.BAD_REPLY_TOPIC, got[0]["reason"], seconds, rss))
        else:
            outcomes.append(
                Outcome(
                    case, None, f"{counted} refusals counted for {len(silent)} cases", seconds, rss
                )
            )
    return outcomes


def run_corpus(workdir: Path) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    outcomes = run_in_process(workdir / "in-process")
    broker_cases = [h for h in all_cases() if h.broker]
    outcomes += run_through_broker(workdir / "broker", broker_cases)
    return outcomes


def _through_broker(h: Hostile) -> Hostile:
    case = Case(h.case.klass, f"broker-{h.case.name}", h.case.expect, h.case.note)
    return Hostile(case, h.topic, h.payload, h.response_topic, h.broker)


__all__ = ["CLASSES", "run_corpus"]
