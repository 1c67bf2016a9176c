"""The command dispatcher: bytes in, one reply out, never an exception.

Order of checks (each failure is an error reply with a code; see docs/mqtt.md):
reply topic -> size -> JSON -> command shape -> topic/target match -> signature ->
lifetime -> repeated id (first reply again, or refused when the body differs) ->
expiry -> known command -> arguments -> run.
A reply only ever goes to a console reply topic; a command that names any other
topic as its reply topic is refused with an event and answered nowhere.
Only commands that passed the signature check are remembered by id, so nobody
without a console key can plant a reply for someone else's command id.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import ServingError
from agent.events import Emit
from agent.link.replies import LEGACY_DIGEST, Remembered, ReplyCache
from agent.protocol.canonical import SignatureError, canonical_json, verify_body
from agent.protocol.events import EventKind
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
from agent.protocol.topics import Topic, is_reply_topic, parse_command_topic

log = logging.getLogger(__name__)


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

    def _bad(self, key: str, what: str) -> CommandError:
        return CommandError(Code.BAD_ARGS, f"{self.command}: argument {key!r} must be {what}")

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._bad(key, f"an integer from {low} to {high}")
        return value

    def string(
        self, key: str, default: str | None = None, choices: Iterable[str] = ()
    ) -> str | None:
        value = self.values.get(key, default)
        options = tuple(choices)
        if value is None:
            return None
        if not isinstance(value, str) or (options and value not in options):
            raise self._bad(key, "one of " + ", ".join(options) if options else "a string")
        return value

    def mapping(self, key: str, required: bool = True) -> dict[str, Any]:
        value = self.values.get(key)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self._bad(key, "an object")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return value

    def raw(self, key: str) -> Any:
        return self.values.get(key)


@dataclass(frozen=True)
class CommandSpec:
    name: str
    summary: str
    args: tuple[str, ...]
    run: Callable[[Args], Any]


@dataclass(frozen=True)
class Request:
    """A command as it arrived, whatever the transport."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Response:
    """What to publish in answer; `reply` is the decoded body, for tests and logs."""

    topic: Topic
    payload: bytes
    correlation_data: bytes | None
    reply: Reply


class RefusalReporter:
    """Turns refusals into `command.refused` events, at most one per code per `every_s`,
    so a flood of junk cannot flood the outbox; the next event says how many it hid."""

    def __init__(
        self,
        emit: Emit,
        every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._hidden: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, code: str, message: str, **data: Any) -> None:
        now = self._clock()
        with self._lock:
            if now - self._last.get(code, -1e18) < self._every_s:
                self._hidden[code] = self._hidden.get(code, 0) + 1
                return
            self._last[code] = now
            hidden = self._hidden.pop(code, 0)
        self._emit(EventKind.COMMAND_REFUSED, message, code=code, suppressed=hidden, **data)


class Dispatcher:
    def __init__(
        self,
        device_id: str,
        groups: Iterable[str],
        table: Mapping[str, CommandSpec],
        keys: list[Ed25519PublicKey],
        require_signature: bool,
        max_payload_bytes: int,
        cache: ReplyCache,
        report: Callable[..., None],
        clock: Callable[[], float] = time.time,
        max_lifetime_s: float = 3600.0,
        clock_skew_s: float = 60.0,
    ) -> None:
        self.device_id = device_id
        self.groups = frozenset(groups)
        self.table = dict(table)
        self.keys = keys
        self.require_signature = require_signature
        self.max_payload_bytes = max_payload_bytes
        self.cache = cache
        self.report = report
        self.clock = clock
        self.max_lifetime_s = max_lifetime_s
        self.clock_skew_s = clock_skew_s

    def handle(self, request: Request) -> Response | None:
        """Never raises: every problem becomes an error reply (or a refusal event and a
        log line when there is nowhere to reply to)."""
        try:
            return self._handle(request)
        except Exception as exc:  # a bug here must not take the link down
            log.exception("command dispatch failed for %s", shown(request.topic, 200))
            reply = Reply.failure(None, Code.FAILED, f"internal error: {type(exc).__name__}")
            try:
                return self._route(request, None, reply)
            except Exception:
                log.exception("cannot even answer the command on %s", shown(request.topic, 200))
                return None

    def _refuse(
        self, request: Request, body: Any, ident: str | None, code: str, message: str, **data: Any
    ) -> Response | None:
        self.report(code, message, topic=shown(request.topic, 200), id=ident, **data)
        return self._route(request, body, Reply.failure(ident, code, message))

    def _handle(self, request: Request) -> Response | None:
        payload = request.payload
        if request.response_topic is not None and not is_reply_topic(request.response_topic):
            # Answering would publish on a topic of someone else's choosing.
            self.report(
                Code.BAD_REPLY_TOPIC,
                bad_reply_topic(request.response_topic),
                topic=shown(request.topic, 200),
                reply_to=shown(request.response_topic, 200),
            )
            return None
        if len(payload) > self.max_payload_bytes:
            message = (
                f"command is {len(payload)} bytes; the limit is {self.max_payload_bytes} "
                "(commands.max_payload_kb)"
            )
            return self._refuse(request, None, None, Code.TOO_LARGE, message)
        try:
            body = loads(payload)
        except ProtocolError as exc:
            return self._refuse(request, None, None, exc.code, exc.message)
        # Best effort, for replying even to a command that is not well formed.
        raw_id = body.get("id") if isinstance(body, dict) else None
        ident = raw_id if isinstance(raw_id, str) and ID_RE.fullmatch(raw_id) else None
        try:
            command = Command.from_json(body)
        except ProtocolError as exc:
            return self._refuse(request, body, ident, exc.code, exc.message)
        refusal = (
            self._check_route(request.topic, command)
            or self._check_signature(body)
            or self._check_lifetime(command)
        )
        if refusal is not None:
            code, message = refusal
            return self._refuse(request, body, command.id, code, message, name=command.name)
        digest = hashlib.sha256(canonical_json(body)).hexdigest()
        known = self.cache.get(command.id)
        if known is not None:
            return self._repeat(request, body, command, digest, known)
        now = self.clock()
        if command.expires_at is not None and now > command.expires_at:
            message = f"command expired {now - command.expires_at:.1f} s ago (expires_at)"
            return self._refuse(request, body, command.id, Code.EXPIRED, message, name=command.name)
        if self.cache.full():
            message = (
                f"{self.cache.max_ids} unexpired command ids are remembered already; "
                "try again when some expire (commands.max_lifetime_s)"
            )
            return self._refuse(request, body, command.id, Code.BUSY, message, name=command.name)
        reply, payload = self._encode(self._execute(command))
        keep_until = (command.expires_at or 0.0) + self.clock_skew_s
        self.cache.put(command.id, digest, payload, keep_until)
        return self._route(request, body, reply)

    def _encode(self, reply: Reply) -> tuple[Reply, bytes]:
        """The reply as sent, and its bytes; a result that is not JSON (NaN in an
        output, say) becomes an error reply instead of an exception."""
        reply = reply.from_device(self.device_id)
        try:
            return reply, dumps(reply.to_json())
        except (TypeError, ValueError) as exc:
            failed = Reply.failure(reply.id, Code.FAILED, f"result is not JSON: {shown(exc, 200)}")
            failed = failed.from_device(self.device_id)
            return failed, dumps(failed.to_json())

    def _repeat(
        self, request: Request, body: Any, command: Command, digest: str, known: Remembered
    ) -> Response | None:
        if known.digest not in (digest, LEGACY_DIGEST):
            message = (
                f"command id {shown(command.id)} was already used by a different command; "
                "every command needs a new id"
            )
            return self._refuse(
                request, body, command.id, Code.ID_REUSED, message, name=command.name
            )
        if known.body is None:
            message = (
                f"command {shown(command.id)} ran already and its reply is no longer kept "
                "(commands.reply_cache_size)"
            )
            return self._refuse(
                request, body, command.id, Code.REPLAYED, message, name=command.name
            )
        log.info(
            "command %s (%s) repeated: sending its first reply again", command.id, command.name
        )
        try:
            reply = Reply.from_json(loads(known.body))
        except ProtocolError:
            message = f"command {shown(command.id)} ran already; its stored reply is unreadable"
            return self._refuse(
                request, body, command.id, Code.REPLAYED, message, name=command.name
            )
        return self._route(request, body, reply)

    def _check_route(self, topic: str, command: Command) -> tuple[str, str] | None:
        route = parse_command_topic(topic)
        if route is None:
            return Code.MISMATCH, f"{shown(topic, 200)} is not a command topic"
        if route.name != command.name:
            return Code.MISMATCH, (
                f"topic says {route.name!r} but the body says {shown(command.name)}"
            )
        if route.scope == "device" and route.target != self.device_id:
            return Code.WRONG_TARGET, f"command is for device {route.target!r}, not this one"
        if route.scope == "group" and route.target not in self.groups:
            return Code.WRONG_TARGET, (
                f"this device is not in group {route.target!r} (mqtt.groups)"
            )
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

    def _check_signature(self, body: dict[str, Any]) -> tuple[str, str] | None:
        if not self.require_signature:
            return None
        try:
            signer = verify_body(body, self.keys)
        except SignatureError as exc:
            return exc.code, exc.message
        log.debug("command signed by %s", signer)
        return None

    def _check_lifetime(self, command: Command) -> tuple[str, str] | None:
        """A signed command lives at most `max_lifetime_s` (a captured one is useless
        after that, and its id is remembered until then)."""
        now = self.clock()
        limit = self.max_lifetime_s
        if command.issued_at is not None and command.issued_at > now + self.clock_skew_s:
            return Code.FROM_THE_FUTURE, (
                f"issued_at is {command.issued_at - now:.1f} s ahead of this device's clock; "
                f"the allowance is {self.clock_skew_s:g} s (commands.clock_skew_s)"
            )
        if command.expires_at is None:
            if self.require_signature:
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

    def _execute(self, command: Command) -> Reply:
        spec = self.table.get(command.name)
        if spec is None:
            known = ", ".join(sorted(self.table))
            message = f"unknown command {command.name!r}; this agent knows {known}"
            self.report(Code.UNKNOWN, message, id=command.id, name=command.name)
            return Reply.failure(command.id, Code.UNKNOWN, message)
        started = time.perf_counter()
        try:
            result = spec.run(Args(command.name, command.args, spec.args))
        except CommandError as exc:
            return Reply.failure(command.id, exc.code, exc.message)
        except ServingError as exc:
            return Reply.failure(command.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("command %s (%s) failed", command.name, command.id)
            return Reply.failure(
                command.id, Code.FAILED, f"{type(exc).__name__}: {shown(exc, 200)}"
            )
        log.info(
            "command %s (%s) done in %.1f ms",
            command.name, command.id, (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        return Reply.success(command.id, result)

    def _route(self, request: Request, body: Any, reply: Reply) -> Response | None:
        """MQTT v5 response topic (with its correlation data), else the body's `reply_to`;
        only ever a console reply topic (`edgerun/v1/console/{id}/reply`)."""
        target = request.response_topic
        if target is None and isinstance(body, dict):
            target = body.get("reply_to")
        if not is_reply_topic(target):
            if target is not None:
                # Debug only: the refusal event already says it, rate limited.
                log.debug("not replying to %s: not a console reply topic", shown(target, 200))
            else:
                log.info(
                    "no reply topic for the command on %s; its reply is dropped (%s)",
                    shown(request.topic, 200),
                    reply.error.code if reply.error is not None else "ok",
                )
            return None
        assert isinstance(target, str)
        reply, payload = self._encode(reply)
        return Response(Topic(target), payload, request.correlation_data, reply)
