"""The device's command checks, storage-agnostic: one pipeline for the agent and the simulator.

Order of checks (docs/mqtt.md "Order of checks"; each failure is an error code):
reply topic -> size -> JSON -> command shape -> topic/target match -> signature ->
lifetime (all in `screen`) -> repeated id -> expiry -> room to remember the id ->
known command -> arguments -> run. The steps after `screen` need the caller's reply
cache (SQLite on the device, memory in the simulator), so the caller runs them in that
order with the helpers below (`check_expiry`, `id_reused`, `unknown_command`, `Args`).
A reply only ever goes to a console reply topic (`reply_target`).

Only the standard library, `cryptography` and `agent.protocol` are imported: the console's
simulator uses this without the agent's runtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol.canonical import SignatureError, canonical_json, verify_body
from agent.protocol.messages import (
    ID_RE,
    Code,
    Command,
    ProtocolError,
    Reply,
    bad_reply_topic,
    dumps,
    loads,
    shown,
)
from agent.protocol.topics import is_reply_topic, parse_command_topic

# The defaults of the agent's `commands.*` settings.
MAX_PAYLOAD_BYTES = 64 * 1024  # commands.max_payload_kb
MAX_LIFETIME_S = 3600.0  # commands.max_lifetime_s
CLOCK_SKEW_S = 60.0  # commands.clock_skew_s

Refusal = tuple[str, str]  # (code, message)
# (payload, body) -> a refusal, or None when the signature is good.
Verify = Callable[[bytes, dict[str, Any]], Refusal | None]


class CommandError(Exception):
    """A handler's refusal: becomes an error reply with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Args:
    """Typed access to a command's `args`; every mistake names the argument."""

    def __init__(self, command: str, values: Mapping[str, Any], accepted: Iterable[str]) -> None:
        self.command = command
        self.values = values
        allowed = set(accepted)
        unknown = sorted(set(values) - allowed)
        if unknown:
            known = ", ".join(sorted(allowed)) or "none"
            raise CommandError(
                Code.BAD_ARGS,
                f"{command}: unknown argument {shown(unknown[0])} (accepted: {known})",
            )

    def bad(self, key: str, what: str) -> CommandError:
        return CommandError(Code.BAD_ARGS, f"{self.command}: argument {key!r} must be {what}")

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.bad(key, f"an integer from {low} to {high}")
        return value

    def string(
        self, key: str, default: str | None = None, choices: Iterable[str] = ()
    ) -> str | None:
        value = self.values.get(key, default)
        options = tuple(choices)
        if value is None:
            return None
        if not isinstance(value, str) or (options and value not in options):
            raise self.bad(key, "one of " + ", ".join(options) if options else "a string")
        return value

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        """`string` with a default that is one of `choices`: never None."""
        value = self.string(key, default, choices)
        assert value is not None  # the default is a string
        return value

    def mapping(self, key: str, required: bool = True) -> dict[str, Any]:
        value = self.values.get(key)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.bad(key, "an object")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(key, "a list of strings")
        return value

    def raw(self, key: str) -> Any:
        return self.values.get(key)


@dataclass(frozen=True)
class Request:
    """A command as it arrived, whatever the transport."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_lifetime_s: float = MAX_LIFETIME_S
    clock_skew_s: float = CLOCK_SKEW_S


@dataclass(frozen=True)
class Screened:
    """A command that passed every check up to the lifetime; `digest` is the SHA-256 of
    its canonical body (what a repeated id is compared by)."""

    body: dict[str, Any]
    command: Command
    digest: str


@dataclass(frozen=True)
class Refused:
    """A refusal before the command ran. `answer` False: the reply topic itself was
    refused, so there is nowhere to answer (an event only)."""

    code: str
    message: str
    body: Any = None
    ident: str | None = None
    name: str | None = None
    answer: bool = True
    data: Mapping[str, str] = field(default_factory=dict)


def verify_with(keys: list[Ed25519PublicKey]) -> Verify:
    """The plain signature check against the configured console keys."""

    def verify(payload: bytes, body: dict[str, Any]) -> Refusal | None:
        try:
            verify_body(body, keys)
        except SignatureError as exc:
            return exc.code, exc.message
        return None

    return verify


def screen(
    topic: str,
    payload: bytes,
    response_topic: str | None,
    *,
    device_id: str,
    groups: frozenset[str],
    verify: Verify | None,
    now: float,
    limits: Limits = Limits(),
) -> Screened | Refused:
    """Reply topic -> size -> JSON -> command shape -> route/target -> signature ->
    lifetime. `verify` None: signatures are not required."""
    if response_topic is not None and not is_reply_topic(response_topic):
        # Answering would publish on a topic of someone else's choosing.
        return Refused(
            Code.BAD_REPLY_TOPIC,
            bad_reply_topic(response_topic),
            answer=False,
            data={"reply_to": shown(response_topic, 200)},
        )
    if len(payload) > limits.max_payload_bytes:
        message = (
            f"command is {len(payload)} bytes; the limit is {limits.max_payload_bytes} "
            "(commands.max_payload_kb)"
        )
        return Refused(Code.TOO_LARGE, message)
    try:
        body = loads(payload)
    except ProtocolError as exc:
        return Refused(exc.code, exc.message)
    # Best effort, for replying even to a command that is not well formed.
    raw_id = body.get("id") if isinstance(body, dict) else None
    ident = raw_id if isinstance(raw_id, str) and ID_RE.fullmatch(raw_id) else None
    try:
        command = Command.from_json(body)
    except ProtocolError as exc:
        return Refused(exc.code, exc.message, body, ident)
    assert isinstance(body, dict)  # Command.from_json accepts only an object
    required = verify is not None
    refusal = (
        check_route(topic, command, device_id, groups, required)
        or (verify(payload, body) if verify is not None else None)
        or check_lifetime(command, now, limits, required)
    )
    if refusal is not None:
        return Refused(*refusal, body=body, ident=command.id, name=command.name)
    return Screened(body, command, hashlib.sha256(canonical_json(body)).hexdigest())


def check_route(
    topic: str, command: Command, device_id: str, groups: frozenset[str], signed: bool
) -> Refusal | None:
    route = parse_command_topic(topic)
    if route is None:
        return Code.MISMATCH, f"{shown(topic, 200)} is not a command topic"
    if route.name != command.name:
        return Code.MISMATCH, f"topic says {route.name!r} but the body says {shown(command.name)}"
    if route.scope == "device" and route.target != device_id:
        return Code.WRONG_TARGET, f"command is for device {route.target!r}, not this one"
    if route.scope == "group" and route.target not in groups:
        return Code.WRONG_TARGET, f"this device is not in group {route.target!r} (mqtt.groups)"
    expected = device_id if route.scope == "device" else f"group:{route.target}"
    if command.to is None:
        if signed:
            return Code.NO_TARGET, f'a signed command must say whom it is for: "to": {expected!r}'
        return None
    if command.to != expected:
        return Code.WRONG_TARGET, (
            f'command is addressed "to" {shown(command.to)} but arrived for {expected!r}'
        )
    return None


def check_lifetime(command: Command, now: float, limits: Limits, signed: bool) -> Refusal | None:
    """A signed command lives at most `max_lifetime_s` (a captured one is useless
    after that, and its id is remembered until then)."""
    skew, limit = limits.clock_skew_s, limits.max_lifetime_s
    if command.issued_at is not None and command.issued_at > now + skew:
        return Code.FROM_THE_FUTURE, (
            f"issued_at is {command.issued_at - now:.1f} s ahead of this device's clock; "
            f"the allowance is {skew:g} s (commands.clock_skew_s)"
        )
    if command.expires_at is None:
        if signed:
            return Code.NO_EXPIRY, (
                f'a signed command must carry "expires_at", at most {limit:g} s after '
                "issued_at (commands.max_lifetime_s)"
            )
        return None
    start = command.issued_at if command.issued_at is not None else now
    if command.expires_at - start > limit:
        return Code.LIFETIME_TOO_LONG, (
            f"command lives {command.expires_at - start:.0f} s (expires_at - "
            f"{'issued_at' if command.issued_at is not None else 'now'}); "
            f"the limit is {limit:g} s (commands.max_lifetime_s)"
        )
    return None


def check_expiry(command: Command, now: float) -> Refusal | None:
    if command.expires_at is not None and now > command.expires_at:
        return Code.EXPIRED, f"command expired {now - command.expires_at:.1f} s ago (expires_at)"
    return None


def keep_until(command: Command, limits: Limits) -> float:
    """Until when a command's id must be remembered."""
    return (command.expires_at or 0.0) + limits.clock_skew_s


def id_reused(command: Command) -> Refusal:
    return Code.ID_REUSED, (
        f"command id {shown(command.id)} was already used by a different command; "
        "every command needs a new id"
    )


def unknown_command(command: Command, known: Iterable[str]) -> Refusal:
    names = ", ".join(sorted(known))
    return Code.UNKNOWN, f"unknown command {command.name!r}; this agent knows {names}"


def encode_reply(reply: Reply, device_id: str) -> tuple[Reply, bytes]:
    """The reply as sent, and its bytes; a result that is not JSON (NaN in an
    output, say) becomes an error reply instead of an exception."""
    reply = reply.from_device(device_id)
    try:
        return reply, dumps(reply.to_json())
    except (TypeError, ValueError) as exc:
        failed = Reply.failure(reply.id, Code.FAILED, f"result is not JSON: {shown(exc, 200)}")
        failed = failed.from_device(device_id)
        return failed, dumps(failed.to_json())


def reply_target(response_topic: str | None, body: Any) -> str | None:
    """MQTT v5 response topic, else the body's `reply_to`; None unless it is a console
    reply topic (`edgerun/v1/console/{id}/reply`)."""
    target = response_topic
    if target is None and isinstance(body, dict):
        target = body.get("reply_to")
    return target if isinstance(target, str) and is_reply_topic(target) else None


def raw_reply_target(response_topic: str | None, body: Any) -> Any:
    """The reply topic asked for, whatever it is (for the log line of a refused one)."""
    if response_topic is None and isinstance(body, dict):
        return body.get("reply_to")
    return response_topic


__all__ = [
    "CLOCK_SKEW_S",
    "MAX_LIFETIME_S",
    "MAX_PAYLOAD_BYTES",
    "Args",
    "CommandError",
    "Limits",
    "Refusal",
    "Refused",
    "Request",
    "Screened",
    "Verify",
    "check_expiry",
    "check_lifetime",
    "check_route",
    "encode_reply",
    "id_reused",
    "keep_until",
    "raw_reply_target",
    "reply_target",
    "screen",
    "unknown_command",
    "verify_with",
]
