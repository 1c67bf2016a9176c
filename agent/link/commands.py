"""The device's command dispatcher: bytes in, one reply out, never an exception.

The checks themselves, in their documented order, are `agent.protocol.commands`
(shared with the console's simulator); this module adds what needs the agent: the
command table, the SQLite reply cache (`agent.link.replies`) and rate-limited
refusal events. Only commands that passed the signature check are remembered by id,
so nobody without a console key can plant a reply for someone else's command id.
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
from agent.events import Emit
from agent.link.replies import LEGACY_DIGEST, Remembered, ReplyCache
from agent.protocol.commands import (
    Args,
    CommandError,
    Limits,
    Refused,
    Request,
    check_expiry,
    encode_reply,
    id_reused,
    keep_until,
    raw_reply_target,
    reply_target,
    screen,
    unknown_command,
    verify_with,
)
from agent.protocol.events import EventKind
from agent.protocol.messages import Code, Command, ProtocolError, Reply, loads, shown
from agent.protocol.topics import Topic

log = logging.getLogger(__name__)

__all__ = [
    "Args",
    "CommandError",
    "CommandSpec",
    "Dispatcher",
    "RefusalReporter",
    "Request",
    "Response",
]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    summary: str
    args: tuple[str, ...]
    run: Callable[[Args], Any]


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
        self.cache = cache
        self.report = report
        self.clock = clock
        self.limits = Limits(max_payload_bytes, max_lifetime_s, clock_skew_s)

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
        verify = verify_with(self.keys) if self.require_signature else None
        checked = screen(
            request.topic,
            request.payload,
            request.response_topic,
            device_id=self.device_id,
            groups=self.groups,
            verify=verify,
            now=self.clock(),
            limits=self.limits,
        )
        if isinstance(checked, Refused):
            data: dict[str, Any] = dict(checked.data)
            if not checked.answer:
                self.report(checked.code, checked.message, topic=shown(request.topic, 200), **data)
                return None
            if checked.name is not None:
                data["name"] = checked.name
            return self._refuse(
                request, checked.body, checked.ident, checked.code, checked.message, **data
            )
        body, command, digest = checked.body, checked.command, checked.digest
        known = self.cache.get(command.id)
        if known is not None:
            return self._repeat(request, body, command, digest, known)
        expired = check_expiry(command, self.clock())
        if expired is not None:
            return self._refuse(request, body, command.id, *expired, name=command.name)
        if self.cache.full():
            message = (
                f"{self.cache.max_ids} unexpired command ids are remembered already; "
                "try again when some expire (commands.max_lifetime_s)"
            )
            return self._refuse(request, body, command.id, Code.BUSY, message, name=command.name)
        reply, payload = encode_reply(self._execute(command), self.device_id)
        self.cache.put(command.id, digest, payload, keep_until(command, self.limits))
        return self._route(request, body, reply)

    def _repeat(
        self, request: Request, body: Any, command: Command, digest: str, known: Remembered
    ) -> Response | None:
        if known.digest not in (digest, LEGACY_DIGEST):
            return self._refuse(request, body, command.id, *id_reused(command), name=command.name)
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

    def _execute(self, command: Command) -> Reply:
        spec = self.table.get(command.name)
        if spec is None:
            code, message = unknown_command(command, self.table)
            self.report(code, message, id=command.id, name=command.name)
            return Reply.failure(command.id, code, message)
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
        target = reply_target(request.response_topic, body)
        if target is None:
            asked = raw_reply_target(request.response_topic, body)
            if asked is not None:
                # Debug only: the refusal event already says it, rate limited.
                log.debug("not replying to %s: not a console reply topic", shown(asked, 200))
            else:
                log.info(
                    "no reply topic for the command on %s; its reply is dropped (%s)",
                    shown(request.topic, 200),
                    reply.error.code if reply.error is not None else "ok",
                )
            return None
        reply, payload = encode_reply(reply, self.device_id)
        return Response(Topic(target), payload, request.correlation_data, reply)
