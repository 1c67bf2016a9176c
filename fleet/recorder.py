"""Every command the console sends, and every reply, goes to the record.

`CommandRecorder` is wired to `FleetClient.on_sent` / `on_reply`. Those hooks run on
the caller's thread and on the MQTT network thread, so they only queue into the
store's `RecordBatcher`, whose one writer appends in batches (a rollout wave's commands
in a few transactions instead of one each). `close()` writes what is queued.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from agent.protocol.canonical import canonical_json
from agent.protocol.messages import Reply
from fleet.errors import FleetError
from fleet.ports import NewRecord, RecordKind, Store
from fleet.store.batch import RecordBatcher

log = logging.getLogger(__name__)

# Arguments up to this size are kept in the record as they were sent (config.set
# values, deploy arguments); bigger ones (infer inputs) only by their digest.
MAX_RECORDED_ARGS = 4096


def sent_record(body: Mapping[str, Any], target: str) -> NewRecord:
    args = body.get("args") or {}
    raw = canonical_json(args)
    data: dict[str, Any] = {
        "command_id": body.get("id"),
        "target": target,
        "name": body.get("name"),
        "args_sha256": hashlib.sha256(raw).hexdigest(),
        "issued_at": body.get("issued_at"),
        "expires_at": body.get("expires_at"),
    }
    if len(raw) <= MAX_RECORDED_ARGS:
        data["args"] = args
    return NewRecord(RecordKind.COMMAND_SENT, data, device_id=target)


def reply_record(command_id: str, reply: Reply) -> NewRecord:
    data: dict[str, Any] = {"command_id": command_id, "ok": reply.ok}
    if reply.error is not None:
        data["code"] = reply.error.code
        data["message"] = reply.error.message[:500]
    elif isinstance(reply.result, dict):
        # A summary: the keys and small scalar values (a job id, "accepted", "pong").
        data["result"] = {
            k: v
            for k, v in reply.result.items()
            if isinstance(v, str | int | float | bool) and len(str(v)) <= 200
        }
    result = "ok" if reply.ok else (reply.error.code if reply.error else "error")
    return NewRecord(RecordKind.COMMAND_REPLY, data, device_id=reply.device_id, result=result)


class CommandRecorder:
    """FleetClient's hooks -> records, written by the store's RecordBatcher (never
    blocks the MQTT thread; a failed write is retried, nothing dropped)."""

    def __init__(self, store: Store, who: tuple[str, str]) -> None:
        self.batcher = RecordBatcher(store, who)

    def sent(self, body: Mapping[str, Any], target: str) -> None:
        self.batcher.add(sent_record(body, target))

    def reply(self, command_id: str, reply: Reply) -> None:
        try:
            self.batcher.add(reply_record(command_id, reply))
        except FleetError as exc:  # a reply after close: it can no longer be recorded
            log.warning("reply to %s not recorded: %s", command_id, exc.message)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued; FleetError(console.store) when it could not be."""
        self.batcher.close(timeout_s)
