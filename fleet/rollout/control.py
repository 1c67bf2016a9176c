"""Control of rollouts from any console: requests, listings, direct rollbacks.

Requests (pause, resume, abort, rollback) are records appended without the lease: the
driver, wherever it runs, reads them on its next tick and obeys. A request that makes
no sense for the rollout's state (pausing a finished one) is refused, saying why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from agent.protocol.messages import Reply
from agent.protocol.update import Phase
from fleet.errors import FleetCode, FleetError
from fleet.ports import Commander, NewRecord, RecordKind, Store, View
from fleet.rollout.state import RolloutState

REQUESTS = {
    "pause": RecordKind.PAUSE_REQUESTED,
    "resume": RecordKind.RESUME_REQUESTED,
    "abort": RecordKind.ABORT_REQUESTED,
    "rollback": RecordKind.ROLLBACK_REQUESTED,
}


def load(store: Store, rollout_id: str) -> RolloutState:
    records = store.records(rollout_id=rollout_id)
    if not records:
        raise FleetError(
            FleetCode.NOT_FOUND,
            f"no rollout {rollout_id!r} in the record (`edge-fleet rollout list` shows them)",
        )
    return RolloutState.fold(records)


def request(
    store: Store, rollout_id: str, what: str, who: tuple[str, str], reason: str = ""
) -> RolloutState:
    """Append a pause/resume/abort/rollback request; returns the state after it."""
    state = load(store, rollout_id)
    done = state.finished
    if done is not None and not (what == "rollback" and done in ("succeeded", "aborted")):
        raise FleetError(
            FleetCode.BAD_INPUT,
            f"rollout {rollout_id} is finished ({done}): nothing to {what} "
            "(`edge-fleet rollback --to DEVICE` rolls devices back directly)",
        )
    if what == "pause" and state.pause_requested:
        raise FleetError(FleetCode.BAD_INPUT, f"rollout {rollout_id} is already paused")
    store.append(
        [NewRecord(REQUESTS[what], {"reason": reason}, rollout_id=rollout_id, result="requested")],
        who=who,
    )
    return load(store, rollout_id)


def rollout_rows(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    rows = []
    for rid in store.rollout_ids(limit):
        try:
            state = load(store, rid)
        except FleetError as exc:
            rows.append({"rollout_id": rid, "phase": "unreadable", "reason": exc.message})
            continue
        summary = state.summary()
        summary["created_ts"] = state.created_ts
        summary["operator"] = state.created_by[1]
        rows.append(summary)
    return rows


# ------------------------------------------------------------------ direct rollback


@dataclass
class DirectRollback:
    device_id: str
    ok: bool
    to_version: str | None
    code: str | None
    message: str
    job: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "ok": self.ok,
            "to_version": self.to_version,
            "code": self.code,
            "message": self.message,
            "job": self.job,
        }


def rollback_devices(
    commander: Commander,
    view: View,
    store: Store,
    devices: list[str],
    *,
    version: str | None,
    who: tuple[str, str],
    timeout_s: float,
    command_timeout_s: float = 10.0,
    on_result: Callable[[DirectRollback], None] | None = None,
) -> list[DirectRollback]:
    """`edge-fleet rollback --to …`: send `rollback` to each device at once, wait for each
    job's final phase (events or retained state), record DEVICE_ROLLED_BACK for each."""
    finals: dict[tuple[str, str], tuple[str, str | None]] = {}

    def on_view(kind: str, device: str, message: Any) -> None:
        if kind != "event":
            return
        event_kind = getattr(message, "kind", "")
        data = getattr(message, "data", {}) or {}
        if isinstance(event_kind, str) and event_kind.startswith("update."):
            phase = event_kind[len("update.") :]
            job = data.get("job")
            if isinstance(job, str) and phase in {p.value for p in Phase if p.final}:
                finals[(device, job)] = (phase, data.get("code"))

    remove = view.add_listener(on_view)
    try:
        args = {"version": version} if version else {}
        futures: dict[str, Future[Reply]] = {
            d: commander.submit(d, "rollback", args, timeout_s=command_timeout_s) for d in devices
        }
        jobs: dict[str, tuple[str, str | None]] = {}
        results: list[DirectRollback] = []

        def done(r: DirectRollback) -> None:
            results.append(r)
            if on_result is not None:
                on_result(r)

        for dev, future in futures.items():
            try:
                reply = future.result(command_timeout_s + 30)
            except FleetError as exc:
                done(DirectRollback(dev, False, version, exc.code.value, exc.message))
                continue
            if not reply.ok:
                err = reply.error
                done(
                    DirectRollback(
                        dev,
                        False,
                        version,
                        err.code if err else "failed",
                        err.message if err else "",
                    )
                )
                continue
            result = reply.result if isinstance(reply.result, dict) else {}
            jobs[dev] = (str(result.get("job")), result.get("version") or version)
        deadline = time.monotonic() + timeout_s
        while jobs:
            for dev, (job, to) in list(jobs.items()):
                final = finals.get((dev, job))
                row = view.row(dev)
                if (
                    final is None
                    and row is not None
                    and row.job == job
                    and row.phase in {p.value for p in Phase if p.final}
                ):
                    final = (str(row.phase), None)
                if final is not None:
                    del jobs[dev]
                    phase, code = final
                    ok = phase in ("rolled_back", "committed") and not code
                    done(DirectRollback(dev, ok, to, None if ok else (code or phase), phase, job))
            if not jobs:
                break
            if time.monotonic() > deadline:
                for dev, (job, to) in jobs.items():
                    done(
                        DirectRollback(
                            dev, False, to, "update.device_timeout", "no final phase in time", job
                        )
                    )
                break
            time.sleep(0.05)
    finally:
        remove()
    store.append(
        [
            NewRecord(
                RecordKind.DEVICE_ROLLED_BACK,
                {**r.to_json(), "needed": True, "direct": True},
                device_id=r.device_id,
                result="ok" if r.ok else (r.code or "failed"),
            )
            for r in results
        ],
        who=who,
    )
    return results
