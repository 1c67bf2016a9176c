"""Every command the console sends, and every reply, goes to the record.

`CommandRecorder` is wired to `FleetClient.on_sent` / `on_reply`. Those hooks run on
the caller's thread and on the MQTT network thread, so they only queue; one writer
thread appends in batches (one transaction for a whole rollout wave's commands
instead of one each). `close()` writes what is queued before it returns.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

from agent.protocol.canonical import canonical_json
from agent.protocol.messages import Reply
from fleet.ports import NewRecord, RecordKind, Store

log = logging.getLogger(__name__)

# Arguments up to this size are kept in the record as they were sent (config.set
# values, deploy arguments); bigger ones (infer inputs) only by their digest.
MAX_RECORDED_ARGS = 4096
BATCH = 500


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
    def __init__(self, store: Store, who: tuple[str, str]) -> None:
        self.store = store
        self.who = who
        self.failures = 0
        self._queue: queue.SimpleQueue[NewRecord | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fleet-recorder", daemon=True)
        self._thread.start()

    def sent(self, body: Mapping[str, Any], target: str) -> None:
        self._queue.put(sent_record(body, target))

    def reply(self, command_id: str, reply: Reply) -> None:
        self._queue.put(reply_record(command_id, reply))

    def close(self, timeout_s: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[NewRecord] = []
            while True:
                if item is None:
                    stop = True
                else:
                    batch.append(item)
                if stop or len(batch) >= BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)

    def _write(self, batch: list[NewRecord]) -> None:
        try:
            self.store.append(batch, who=self.who)
        except Exception as exc:  # the record's trouble is reported, the commands go on
            self.failures += len(batch)
            log.error("could not record %d command(s): %s", len(batch), exc)
