"""The command dispatcher: bytes in, one reply out, never an exception.

Order of checks (each failure is an error reply with a code; see docs/mqtt.md):
size -> JSON -> command shape -> topic/target match -> signature -> repeated id
(first reply again) -> expiry -> known command -> arguments -> run.
Only commands that passed the signature check are remembered by id, so nobody
without a console key can plant a reply for someone else's command id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import ServingError
from agent.link.replies import ReplyCache
from agent.protocol.canonical import SignatureError, verify_body
from agent.protocol.messages import Code, Command, ProtocolError, Reply, dumps, loads
from agent.protocol.topics import Topic, TopicError, parse_command_topic

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
                Code.BAD_ARGS, f"{command}: unknown argument {unknown[0]!r} (accepted: {known})"
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
        emit: Callable[..., Any],
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
        self._emit("command.refused", message, code=code, suppressed=hidden, **data)


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

    def handle(self, request: Request) -> Response | None:
        """Never raises: every problem becomes an error reply (or a log line when there
        is nowhere to reply to)."""
        try:
            return self._handle(request)
        except Exception as exc:  # a bug here must not take the link down
            log.exception("command dispatch failed for %s", request.topic)
            reply = Reply.failure(None, Code.FAILED, f"internal error: {type(exc).__name__}")
            return self._route(request, None, reply)

    def _handle(self, request: Request) -> Response | None:
        payload = request.payload
        if len(payload) > self.max_payload_bytes:
            message = (
                f"command is {len(payload)} bytes; the limit is {self.max_payload_bytes} "
                "(commands.max_payload_kb)"
            )
            self.report(Code.TOO_LARGE, message, topic=request.topic)
            return self._route(request, None, Reply.failure(None, Code.TOO_LARGE, message))
        try:
            body = loads(payload)
        except ProtocolError as exc:
            self.report(exc.code, exc.message, topic=request.topic)
            return self._route(request, None, Reply.failure(None, exc.code, exc.message))
        # Best effort, for replying even to a command that is not well formed.
        raw_id = body.get("id") if isinstance(body, dict) else None
        ident = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
        try:
            command = Command.from_json(body)
        except ProtocolError as exc:
            self.report(exc.code, exc.message, topic=request.topic, id=ident)
            return self._route(request, body, Reply.failure(ident, exc.code, exc.message))
        refusal = self._check_route(request.topic, command) or self._check_signature(body)
        if refusal is not None:
            code, message = refusal
            self.report(code, message, topic=request.topic, id=command.id, name=command.name)
            return self._route(request, body, Reply.failure(command.id, code, message))
        cached = self.cache.get(command.id)
        if cached is not None:
            log.info(
                "command %s (%s) repeated: sending its first reply again", command.id, command.name
            )
            return self._route(request, body, Reply.from_json(loads(cached)))
        reply = self._execute(command)
        if reply.error is None or reply.error.code != Code.EXPIRED:
            self.cache.put(command.id, dumps(reply.to_json()))
        return self._route(request, body, reply)

    def _check_route(self, topic: str, command: Command) -> tuple[str, str] | None:
        route = parse_command_topic(topic)
        if route is None:
            return Code.MISMATCH, f"{topic!r} is not a command topic"
        if route.name != command.name:
            return Code.MISMATCH, (f"topic says {route.name!r} but the body says {command.name!r}")
        if route.scope == "device" and route.target != self.device_id:
            return Code.MISMATCH, f"command is for device {route.target!r}, not this one"
        if route.scope == "group" and route.target not in self.groups:
            return Code.MISMATCH, f"this device is not in group {route.target!r}"
        if command.to is not None:
            expected = self.device_id if route.scope == "device" else f"group:{route.target}"
            if command.to != expected:
                return Code.MISMATCH, (
                    f'command is addressed "to" {command.to!r} but arrived for {expected!r}'
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

    def _execute(self, command: Command) -> Reply:
        now = self.clock()
        if command.expires_at is not None and now > command.expires_at:
            message = f"command expired {now - command.expires_at:.1f} s ago"
            self.report(Code.EXPIRED, message, id=command.id, name=command.name)
            return Reply.failure(command.id, Code.EXPIRED, message)
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
            return Reply.failure(command.id, Code.FAILED, f"{type(exc).__name__}: {exc}")
        log.info(
            "command %s (%s) done in %.1f ms",
            command.name, command.id, (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        return Reply.success(command.id, result)

    def _route(self, request: Request, body: Any, reply: Reply) -> Response | None:
        """MQTT v5 response topic (with its correlation data), else the body's `reply_to`."""
        target = request.response_topic
        if not target and isinstance(body, dict) and isinstance(body.get("reply_to"), str):
            target = body["reply_to"]
        if not target:
            log.warning(
                "no reply topic for command on %s; dropping reply %s",
                request.topic, reply.to_json(),
            )  # fmt: skip
            return None
        try:
            topic = Topic(target)
        except TopicError as exc:
            log.warning("cannot reply to %r: %s", target, exc)
            return None
        reply = reply.from_device(self.device_id)
        try:
            payload = dumps(reply.to_json())
        except (TypeError, ValueError) as exc:
            reply = Reply.failure(reply.id, Code.FAILED, f"result is not JSON: {exc}")
            reply = reply.from_device(self.device_id)
            payload = dumps(reply.to_json())
        return Response(topic, payload, request.correlation_data, reply)
