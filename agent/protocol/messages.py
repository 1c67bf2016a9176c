"""Command, reply, status, telemetry and event bodies as typed values, with their JSON.

Every `from_json` checks types and raises ProtocolError with a stable code; every
`to_json` returns plain JSON-able data. Encoding is compact UTF-8 JSON (`dumps`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.accelerator import AcceleratorFormatError, AcceleratorReport
from agent.protocol.topics import (
    TOPICS_DOTTED,
    TOPICS_PORTABLE,
    TopicError,
    command_name,
    is_reply_topic,
    target_name,
)
from agent.strictjson import finite_float, refuse_constant, unique_keys


class Code:
    """Stable error codes carried in replies (`error.code`)."""

    MALFORMED = "command.malformed"  # not JSON, not an object, or a field of the wrong type
    TOO_LARGE = "command.too_large"
    UNKNOWN = "command.unknown"
    BAD_ARGS = "command.bad_args"
    EXPIRED = "command.expired"
    UNSIGNED = "command.unsigned"
    BAD_SIGNATURE = "command.bad_signature"
    MISMATCH = "command.mismatch"  # not a command topic, or topic and body name differ
    WRONG_TARGET = "command.wrong_target"  # for another device or a group it is not in
    NO_TARGET = "command.no_target"  # signed without "to"
    NO_EXPIRY = "command.no_expiry"  # signed without "expires_at"
    LIFETIME_TOO_LONG = "command.lifetime_too_long"  # beyond commands.max_lifetime_s
    FROM_THE_FUTURE = "command.issued_in_future"  # beyond commands.clock_skew_s
    ID_REUSED = "command.id_reused"  # a known id on a different command body
    REPLAYED = "command.replayed"  # ran already; its reply is no longer kept
    BAD_REPLY_TOPIC = "command.bad_reply_topic"  # reply_to / response topic not a reply topic
    BUSY = "command.busy"  # too many unexpired command ids remembered
    FAILED = "command.failed"  # the handler broke; the agent keeps running
    NOT_TUNABLE = "config.not_tunable"
    INVALID_VALUE = "config.invalid"
    STATE_MALFORMED = "state.malformed"  # a retained state a console cannot read
    REPLY_MALFORMED = "reply.malformed"  # a job reply's result a console cannot read


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


MAX_ID_LENGTH = 128
MAX_DEPTH = 64  # objects and arrays inside each other; a command needs a handful
MAX_SIG_LENGTH = 128  # base64 of a 64-byte ed25519 signature is 88
# Printable ASCII without space: ids travel in logs, events and SQL keys unescaped.
ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_LENGTH}}}")
# Unix seconds a command may name: 1970 up to the year 5138 (floats stay exact).
MAX_TIME = 1e11
COMMAND_KEYS = frozenset({"id", "name", "args", "issued_at", "expires_at", "to", "reply_to", "sig"})


def loads(payload: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity (nor numbers that overflow to it), no repeated keys (a signed body means one
    thing), and no lone surrogates: JSON lets "\\ud800" through, but such a string can
    never be encoded again, so an id or a refusal event holding one would be lost."""
    try:
        text = payload.decode("utf-8")
        value = json.loads(
            text,
            # The bundle reader's hooks: one rule for NaN, overflow and repeated keys.
            parse_constant=refuse_constant,
            parse_float=finite_float,
            object_pairs_hook=unique_keys,
        )
    except UnicodeDecodeError as exc:
        raise ProtocolError(Code.MALFORMED, f"payload is not UTF-8: {exc}") from exc
    except RecursionError as exc:
        raise ProtocolError(Code.MALFORMED, "payload nests too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, our checks, over-long integers
        raise ProtocolError(
            Code.MALFORMED, f"payload is not valid JSON: {shown(exc, 200)}"
        ) from exc
    _check_document(value)
    return value


def _check_document(value: Any) -> None:
    """Every key and string must be valid Unicode (no lone surrogates), and nothing may
    nest deeper than MAX_DEPTH: the parser stops near the interpreter's recursion limit,
    but the encoders (canonical form, replies) run deeper in the stack and would hit
    it first. Iterative, so a deep document cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _encodable(item)
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ProtocolError(Code.MALFORMED, f"payload nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _encodable(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _encodable(text: str) -> None:
    try:
        text.encode("utf-8", "strict")
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            Code.MALFORMED,
            f"payload holds a lone surrogate ({shown(text)}): strings must be valid Unicode",
        ) from exc


def shown(value: object, limit: int = 64) -> str:
    """A value for an error message: repr (escapes control characters and surrogates),
    cut to `limit` characters so a hostile value cannot bloat replies and events."""
    text = repr(value) if isinstance(value, str) else str(value)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dumps(obj: Any) -> bytes:
    return json.dumps(
        obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_fallback
    ).encode("utf-8")


def _fallback(value: Any) -> Any:
    # Paths, numpy scalars and the like in event data: their text is good enough.
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)


def _number(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    # Compare before float(): an integer of 400 digits would overflow the conversion.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (isinstance(value, int) or math.isfinite(value))
        or not 0 <= value <= MAX_TIME
    ):
        raise ProtocolError(
            Code.MALFORMED,
            f'"{key}" must be a number of Unix seconds from 0 to {MAX_TIME:.0f}, '
            f"not {shown(value)}",
        )
    return float(value)


def _string(obj: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ProtocolError(Code.MALFORMED, f'"{key}" is missing')
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(
            Code.MALFORMED, f'"{key}" must be a non-empty string, not {shown(value)}'
        )
    return value


@dataclass(frozen=True)
class Command:
    id: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    issued_at: float | None = None
    expires_at: float | None = None
    to: str | None = None  # a device id or "group:NAME"; binds a signature to its target
    reply_to: str | None = None  # MQTT 3.1.1 only: where the reply goes
    sig: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Command:
        if not isinstance(obj, dict):
            raise ProtocolError(Code.MALFORMED, "a command must be a JSON object")
        unknown = sorted(set(obj) - COMMAND_KEYS)
        if unknown:
            raise ProtocolError(
                Code.MALFORMED,
                f"unknown field {shown(unknown[0])}; a command has {', '.join(sorted(COMMAND_KEYS))}",
            )
        ident = _string(obj, "id", required=True)
        assert ident is not None
        if not ID_RE.fullmatch(ident):
            raise ProtocolError(
                Code.MALFORMED,
                f'"id" must be 1-{MAX_ID_LENGTH} printable ASCII characters without spaces, '
                f"not {shown(ident)}",
            )
        name = _string(obj, "name", required=True)
        assert name is not None
        try:
            command_name(name)
        except TopicError:
            raise ProtocolError(
                Code.MALFORMED,
                f'"name" {shown(name)} must be lower-case words joined by dots (e.g. config.get)',
            ) from None
        args = obj.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ProtocolError(Code.MALFORMED, f'"args" must be an object, not {shown(args)}')
        to = _string(obj, "to")
        if to is not None and target_name(to) is None:
            raise ProtocolError(
                Code.MALFORMED, f'"to" must be a device id or "group:NAME", not {shown(to)}'
            )
        reply_to = _string(obj, "reply_to")
        if reply_to is not None and not is_reply_topic(reply_to):
            raise ProtocolError(Code.BAD_REPLY_TOPIC, bad_reply_topic(reply_to))
        sig = _string(obj, "sig")
        if sig is not None and (not sig.isascii() or len(sig) > MAX_SIG_LENGTH):
            raise ProtocolError(
                Code.BAD_SIGNATURE,
                f'"sig" must be base64 (ASCII) of at most {MAX_SIG_LENGTH} characters',
            )
        return cls(
            id=ident,
            name=name,
            args=args,
            issued_at=_number(obj, "issued_at"),
            expires_at=_number(obj, "expires_at"),
            to=to,
            reply_to=reply_to,
            sig=sig,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "args": self.args}
        for key in ("issued_at", "expires_at", "to", "reply_to", "sig"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def bad_reply_topic(value: str) -> str:
    return (
        f"reply topic {shown(value)} is not a console reply topic "
        "(edgerun/v1/console/{console_id}/reply): the command is not run and not answered"
    )


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


@dataclass(frozen=True)
class Reply:
    id: str | None
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None
    # Who answers: a group command gets one reply per member on the same topic.
    device_id: str | None = None

    def from_device(self, device_id: str) -> Reply:
        return dataclasses.replace(self, device_id=device_id)

    @classmethod
    def success(cls, ident: str | None, result: Any) -> Reply:
        return cls(ident, True, result)

    @classmethod
    def failure(cls, ident: str | None, code: str, message: str) -> Reply:
        return cls(ident, False, error=ErrorInfo(code, message))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "ok": self.ok}
        if self.ok:
            out["result"] = self.result
        else:
            assert self.error is not None
            out["error"] = {"code": self.error.code, "message": self.error.message}
        if self.device_id is not None:
            out["device_id"] = self.device_id
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Reply:
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            raise ProtocolError(Code.MALFORMED, 'a reply is an object with a boolean "ok"')
        ident = obj.get("id")
        if ident is not None and not isinstance(ident, str):
            raise ProtocolError(Code.MALFORMED, '"id" must be a string or null')
        device = obj.get("device_id")
        device = device if isinstance(device, str) else None
        if obj["ok"]:
            return cls(ident, True, obj.get("result"), device_id=device)
        err = obj.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("code"), str):
            raise ProtocolError(Code.MALFORMED, 'a failed reply needs "error": {"code", "message"}')
        error = ErrorInfo(err["code"], str(err.get("message", "")))
        return cls(ident, False, error=error, device_id=device)


# Lenient readers for what a console receives from devices: a missing field has its
# default, a field of the wrong type is a ProtocolError (never a TypeError/ValueError).


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(Code.MALFORMED, f'"{key}" must be a string, not {shown(value)}')
    return value


def _seconds(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(Code.MALFORMED, f'"{key}" must be a number, not {shown(value)}')
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(Code.MALFORMED, f'"{key}" is out of range') from None


def _object(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(Code.MALFORMED, f'"{key}" must be an object, not {shown(value)}')
    return value


@dataclass(frozen=True)
class Status:
    """Retained on `…/status`; the broker publishes the `offline` one as the last will."""

    device_id: str
    state: str  # "online" or "offline"
    agent_version: str
    since: float
    reason: str = ""
    # Which command-topic spellings the device subscribes to (`agent.protocol.topics`
    # TOPICS_PORTABLE: `cmd/config-get` as well as `cmd/config.get`). Agents before this
    # field took only the dotted spelling: absent reads as TOPICS_DOTTED.
    topics: int = TOPICS_PORTABLE

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "state": self.state,
            "agent_version": self.agent_version,
            "since": self.since,
            "reason": self.reason,
            "topics": self.topics,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Status:
        if not isinstance(obj, dict) or obj.get("state") not in ("online", "offline"):
            raise ProtocolError(Code.MALFORMED, 'a status has "state": "online" or "offline"')
        return cls(
            device_id=_text(obj, "device_id"),
            state=obj["state"],
            agent_version=_text(obj, "agent_version"),
            since=_seconds(obj, "since"),
            reason=_text(obj, "reason"),
            topics=_topics(obj),
        )


def _topics(obj: dict[str, Any]) -> int:
    value = obj.get("topics", TOPICS_DOTTED)
    if isinstance(value, bool) or not isinstance(value, int) or value < TOPICS_DOTTED:
        raise ProtocolError(
            Code.MALFORMED, f'"topics" must be an integer from {TOPICS_DOTTED}, not {shown(value)}'
        )
    return value


@dataclass(frozen=True)
class EventMessage:
    """One event on `…/events`; `seq` counts up by one per device, with no gaps unless
    the outbox had to drop (it then says so in an `outbox.dropped` event)."""

    device_id: str
    seq: int
    ts: float
    kind: str
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "reason": self.reason,
            "data": self.data,
        }

    @classmethod
    def from_json(cls, obj: Any) -> EventMessage:
        if not isinstance(obj, dict) or type(obj.get("seq")) is not int:
            raise ProtocolError(Code.MALFORMED, 'an event is an object with an integer "seq"')
        return cls(
            device_id=_text(obj, "device_id"),
            seq=obj["seq"],
            ts=_seconds(obj, "ts"),
            kind=_text(obj, "kind"),
            reason=_text(obj, "reason"),
            data=_object(obj, "data"),
        )


@dataclass(frozen=True)
class TelemetryMessage:
    """One report on `…/telemetry` (see docs/mqtt.md for every figure)."""

    device_id: str
    seq: int
    ts: float
    interval_s: float
    inference: dict[str, Any]
    system: dict[str, Any]
    model: dict[str, Any] | None
    outbox: dict[str, Any]
    # A Jetson's GPU, memory, temperatures and rails (agent/hardware/); absent elsewhere.
    accelerator: AcceleratorReport | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "device_id": self.device_id,
            "seq": self.seq,
            "ts": self.ts,
            "interval_s": self.interval_s,
            "inference": self.inference,
            "system": self.system,
            "model": self.model,
            "outbox": self.outbox,
        }
        if self.accelerator is not None:  # older consoles never see the key
            body["accelerator"] = self.accelerator.to_json()
        return body

    @classmethod
    def from_json(cls, obj: Any) -> TelemetryMessage:
        if not isinstance(obj, dict) or type(obj.get("seq")) is not int:
            raise ProtocolError(Code.MALFORMED, 'telemetry is an object with an integer "seq"')
        model = obj.get("model")
        if model is not None and not isinstance(model, dict):
            raise ProtocolError(Code.MALFORMED, '"model" must be an object or null')
        accelerator = None
        if obj.get("accelerator") is not None:
            try:
                accelerator = AcceleratorReport.from_json(obj["accelerator"])
            except AcceleratorFormatError as exc:
                raise ProtocolError(Code.MALFORMED, str(exc)) from exc
        return cls(
            device_id=_text(obj, "device_id"),
            seq=obj["seq"],
            ts=_seconds(obj, "ts"),
            interval_s=_seconds(obj, "interval_s"),
            inference=_object(obj, "inference"),
            system=_object(obj, "system"),
            model=model,
            outbox=_object(obj, "outbox"),
            accelerator=accelerator,
        )
