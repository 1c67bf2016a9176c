"""The device's command checks, for simulated devices: bytes in, one reply out.

The same order and codes as the agent's dispatcher (docs/mqtt.md "Order of checks"):
reply topic -> size -> JSON -> command shape -> topic/target -> signature ->
lifetime -> repeated id -> expiry -> known command -> arguments -> run. Built only
on `agent.protocol` (the console's side of the contract), with an in-memory reply
cache instead of the agent's SQLite one, so ten thousand devices fit in a process.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
from agent.protocol.topics import CommandRoute, is_reply_topic, parse_command_topic

MAX_PAYLOAD_BYTES = 64 * 1024  # commands.max_payload_kb default
MAX_LIFETIME_S = 3600.0  # commands.max_lifetime_s default
CLOCK_SKEW_S = 60.0  # commands.clock_skew_s default
REPLY_CACHE = 256  # replies kept per simulated device (the agent keeps 1000 on disk)


class CommandError(Exception):
    """A handler's refusal: an error reply with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    correlation_data: bytes | None
    reply: Reply


class SignatureCache:
    """Signature verdicts by payload digest, shared by every device of a simulator: a
    group command to 1,000 devices is verified once (the verdict does not depend on
    the device; the target checks that do run per device)."""

    def __init__(self, keys: list[Ed25519PublicKey], size: int = 4096) -> None:
        self.keys = keys
        self.size = size
        self._seen: OrderedDict[bytes, tuple[str, str] | None] = OrderedDict()

    def check(self, payload: bytes, body: dict[str, Any]) -> tuple[str, str] | None:
        key = hashlib.sha256(payload).digest()
        if key in self._seen:
            self._seen.move_to_end(key)
            return self._seen[key]
        try:
            verify_body(body, self.keys)
            verdict = None
        except SignatureError as exc:
            verdict = (exc.code, exc.message)
        self._seen[key] = verdict
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return verdict


Handler = Callable[[str, dict[str, Any]], Any]  # (command name, args) -> result


class SimDispatcher:
    """One per simulated device; runs on the simulator's loop thread."""

    def __init__(
        self,
        device_id: str,
        groups: Iterable[str],
        names: Iterable[str],
        handler: Handler,
        signatures: SignatureCache | None,
        report: Callable[[str, str, dict[str, Any]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.groups = frozenset(groups)
        self.names = frozenset(names)
        self.handler = handler
        self.signatures = signatures  # None: signatures not required (tests only)
        self.report = report
        self.clock = clock
        # id -> (digest, reply bytes, keep_until)
        self.replies: OrderedDict[str, tuple[str, bytes, float]] = OrderedDict()

    @property
    def require_signature(self) -> bool:
        return self.signatures is not None

    def handle(self, msg: Incoming) -> Outgoing | None:
        try:
            return self._handle(msg)
        except Exception as exc:  # a bug must not stop the device
            reply = Reply.failure(None, Code.FAILED, f"internal error: {type(exc).__name__}")
            return self._route(msg, None, reply)

    def _refuse(
        self, msg: Incoming, body: Any, ident: str | None, code: str, message: str
    ) -> Outgoing | None:
        self.report(code, message, {"topic": shown(msg.topic, 200), "id": ident})
        return self._route(msg, body, Reply.failure(ident, code, message))

    def _handle(self, msg: Incoming) -> Outgoing | None:
        if msg.response_topic is not None and not is_reply_topic(msg.response_topic):
            self.report(
                Code.BAD_REPLY_TOPIC,
                bad_reply_topic(msg.response_topic),
                {"topic": shown(msg.topic, 200), "reply_to": shown(msg.response_topic, 200)},
            )
            return None
        if len(msg.payload) > MAX_PAYLOAD_BYTES:
            message = (
                f"command is {len(msg.payload)} bytes; the limit is {MAX_PAYLOAD_BYTES} "
                "(commands.max_payload_kb)"
            )
            return self._refuse(msg, None, None, Code.TOO_LARGE, message)
        try:
            body = loads(msg.payload)
        except ProtocolError as exc:
            return self._refuse(msg, None, None, exc.code, exc.message)
        raw_id = body.get("id") if isinstance(body, dict) else None
        ident = raw_id if isinstance(raw_id, str) and ID_RE.fullmatch(raw_id) else None
        try:
            command = Command.from_json(body)
        except ProtocolError as exc:
            return self._refuse(msg, body, ident, exc.code, exc.message)
        refusal = (
            self._check_route(msg.topic, command)
            or self._check_signature(msg.payload, body)
            or self._check_lifetime(command)
        )
        if refusal is not None:
            return self._refuse(msg, body, command.id, *refusal)
        digest = hashlib.sha256(canonical_json(body)).hexdigest()
        known = self.replies.get(command.id)
        if known is not None:
            if known[0] != digest:
                message = (
                    f"command id {shown(command.id)} was already used by a different command; "
                    "every command needs a new id"
                )
                return self._refuse(msg, body, command.id, Code.ID_REUSED, message)
            return self._route(msg, body, Reply.from_json(loads(known[1])), known[1])
        now = self.clock()
        if command.expires_at is not None and now > command.expires_at:
            message = f"command expired {now - command.expires_at:.1f} s ago (expires_at)"
            return self._refuse(msg, body, command.id, Code.EXPIRED, message)
        reply = self._execute(command).from_device(self.device_id)
        try:
            payload = dumps(reply.to_json())
        except (TypeError, ValueError) as exc:
            reply = Reply.failure(command.id, Code.FAILED, f"result is not JSON: {shown(exc, 200)}")
            reply = reply.from_device(self.device_id)
            payload = dumps(reply.to_json())
        self._remember(command.id, digest, payload, (command.expires_at or 0.0) + CLOCK_SKEW_S)
        return self._route(msg, body, reply, payload)

    def _remember(self, ident: str, digest: str, payload: bytes, keep_until: float) -> None:
        self.replies[ident] = (digest, payload, keep_until)
        if len(self.replies) > REPLY_CACHE:
            now = self.clock()
            for old in [k for k, v in self.replies.items() if v[2] < now][: len(self.replies)]:
                del self.replies[old]
                if len(self.replies) <= REPLY_CACHE:
                    break
            while len(self.replies) > 4 * REPLY_CACHE:  # bounded even under a flood
                self.replies.popitem(last=False)

    def _check_route(self, topic: str, command: Command) -> tuple[str, str] | None:
        route: CommandRoute | None = parse_command_topic(topic)
        if route is None:
            return Code.MISMATCH, f"{shown(topic, 200)} is not a command topic"
        if route.name != command.name:
            return (
                Code.MISMATCH,
                f"topic says {route.name!r} but the body says {shown(command.name)}",
            )
        if route.scope == "device" and route.target != self.device_id:
            return Code.WRONG_TARGET, f"command is for device {route.target!r}, not this one"
        if route.scope == "group" and route.target not in self.groups:
            return Code.WRONG_TARGET, f"this device is not in group {route.target!r} (mqtt.groups)"
        expected = self.device_id if route.scope == "device" else f"group:{route.target}"
        if command.to is None:
            if self.require_signature:
                return Code.NO_TARGET, (
                    f'a signed command must say whom it is for: "to": {expected!r}'
                )
            return None
        if command.to != expected:
            return Code.WRONG_TARGET, (
                f'command is addressed "to" {shown(command.to)} but arrived for {expected!r}'
            )
        return None

    def _check_signature(self, payload: bytes, body: dict[str, Any]) -> tuple[str, str] | None:
        if self.signatures is None:
            return None
        return self.signatures.check(payload, body)

    def _check_lifetime(self, command: Command) -> tuple[str, str] | None:
        now = self.clock()
        if command.issued_at is not None and command.issued_at > now + CLOCK_SKEW_S:
            return Code.FROM_THE_FUTURE, (
                f"issued_at is {command.issued_at - now:.1f} s ahead of this device's clock; "
                f"the allowance is {CLOCK_SKEW_S:g} s (commands.clock_skew_s)"
            )
        if command.expires_at is None:
            if self.require_signature:
                return Code.NO_EXPIRY, (
                    f'a signed command must carry "expires_at", at most {MAX_LIFETIME_S:g} s '
                    "after issued_at (commands.max_lifetime_s)"
                )
            return None
        start = command.issued_at if command.issued_at is not None else now
        if command.expires_at - start > MAX_LIFETIME_S:
            return Code.LIFETIME_TOO_LONG, (
                f"command lives {command.expires_at - start:.0f} s; the limit is "
                f"{MAX_LIFETIME_S:g} s (commands.max_lifetime_s)"
            )
        return None

    def _execute(self, command: Command) -> Reply:
        if command.name not in self.names:
            known = ", ".join(sorted(self.names))
            message = f"unknown command {command.name!r}; this agent knows {known}"
            self.report(Code.UNKNOWN, message, {"id": command.id, "name": command.name})
            return Reply.failure(command.id, Code.UNKNOWN, message)
        try:
            return Reply.success(command.id, self.handler(command.name, command.args))
        except CommandError as exc:
            return Reply.failure(command.id, exc.code, exc.message)

    def _target(self, msg: Incoming, body: Any) -> tuple[str, bytes | None]:
        target = msg.response_topic
        if target is None and isinstance(body, dict):
            target = body.get("reply_to")
        return (target if isinstance(target, str) and is_reply_topic(target) else ""), (
            msg.correlation_data
        )

    def _route(
        self, msg: Incoming, body: Any, reply: Reply, payload: bytes | None = None
    ) -> Outgoing | None:
        """Only ever to a console reply topic (v5 response topic, else `reply_to`)."""
        target, correlation = self._target(msg, body)
        if not target:
            return None
        reply = reply.from_device(self.device_id)
        return Outgoing(
            target,
            payload if payload is not None else dumps(reply.to_json()),
            correlation,
            reply,
        )


class Args:
    """Typed access to `args`; unknown arguments refused by name (as the device does)."""

    def __init__(self, command: str, values: dict[str, Any], accepted: Iterable[str]) -> None:
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

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        value = self.values.get(key, default)
        options = tuple(choices)
        if not isinstance(value, str) or value not in options:
            raise self.bad(key, "one of " + ", ".join(options))
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(key, "a list of strings")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.values.get(key)
        if not isinstance(value, dict):
            raise self.bad(key, "an object")
        return value


__all__ = ["Args", "CommandError", "Incoming", "Outgoing", "SignatureCache", "SimDispatcher"]
