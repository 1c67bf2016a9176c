"""The device's command checks, for simulated devices: bytes in, one reply out.

The checks are the agent's own (`agent.protocol.commands`, in the order of docs/mqtt.md
"Order of checks"); this module adds an in-memory reply cache instead of the agent's
SQLite one, so ten thousand devices fit in a process, and a signature verdict cache
shared by the devices of one simulator.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol.canonical import SignatureError, verify_body
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
    reply_target,
    screen,
    unknown_command,
)
from agent.protocol.messages import Code, Command, Reply, loads, shown

REPLY_CACHE = 256  # replies kept per simulated device (the agent keeps 1000 on disk)
LIMITS = Limits()  # the agent's defaults


Incoming = Request  # a command as it arrived (the device's own type)


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
        checked = screen(
            msg.topic,
            msg.payload,
            msg.response_topic,
            device_id=self.device_id,
            groups=self.groups,
            verify=self.signatures.check if self.signatures is not None else None,
            now=self.clock(),
            limits=LIMITS,
        )
        if isinstance(checked, Refused):
            if not checked.answer:
                data = {"topic": shown(msg.topic, 200), **checked.data}
                self.report(checked.code, checked.message, data)
                return None
            return self._refuse(msg, checked.body, checked.ident, checked.code, checked.message)
        body, command, digest = checked.body, checked.command, checked.digest
        known = self.replies.get(command.id)
        if known is not None:
            if known[0] != digest:
                return self._refuse(msg, body, command.id, *id_reused(command))
            return self._route(msg, body, Reply.from_json(loads(known[1])), known[1])
        expired = check_expiry(command, self.clock())
        if expired is not None:
            return self._refuse(msg, body, command.id, *expired)
        reply, payload = encode_reply(self._execute(command), self.device_id)
        self._remember(command.id, digest, payload, keep_until(command, LIMITS))
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

    def _execute(self, command: Command) -> Reply:
        if command.name not in self.names:
            code, message = unknown_command(command, self.names)
            self.report(code, message, {"id": command.id, "name": command.name})
            return Reply.failure(command.id, code, message)
        try:
            return Reply.success(command.id, self.handler(command.name, command.args))
        except CommandError as exc:
            return Reply.failure(command.id, exc.code, exc.message)

    def _route(
        self, msg: Incoming, body: Any, reply: Reply, payload: bytes | None = None
    ) -> Outgoing | None:
        """Only ever to a console reply topic (v5 response topic, else `reply_to`)."""
        target = reply_target(msg.response_topic, body)
        if target is None:
            return None
        reply = reply.from_device(self.device_id)
        return Outgoing(
            target,
            payload if payload is not None else encode_reply(reply, self.device_id)[1],
            msg.correlation_data,
            reply,
        )


__all__ = [
    "Args",
    "CommandError",
    "Incoming",
    "Outgoing",
    "SignatureCache",
    "SimDispatcher",
]
