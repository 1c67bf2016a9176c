"""A rollout as the dashboard serves it (`GET /api/rollouts/{id}`), kept folded.

A 10,000-device rollout has tens of thousands of records and its page asks again on
every `rollout` event (twice a second while it runs): each rollout is folded once, and
then each request reads only the records after the last one it folded (`after_seq`)
and applies them (`RolloutState.apply`), with the wave times and the latest records
kept beside the state. The answer's JSON bytes are kept with the fold and dropped
when a record is applied, so a request that finds nothing new serialises nothing.
The last `KEPT` rollouts asked for stay folded.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from typing import Any

from starlette.responses import JSONResponse

from fleet.errors import FleetCode, FleetError
from fleet.ports import Record, RecordKind, Store
from fleet.rollout.state import RolloutState

RECORDS_SHOWN = 200
KEPT = 20


class FoldedRollout:
    def __init__(self, records: list[Record]) -> None:
        self.state = RolloutState.fold(records)
        self.started: dict[int, float] = {}
        self.finished: dict[int, float] = {}
        self.recent: deque[Record] = deque(maxlen=RECORDS_SHOWN)
        self.lock = threading.Lock()
        self._body: bytes | None = None  # to_json() serialised; None once a record lands
        self._times(records)

    def add(self, records: list[Record]) -> None:
        """Records after the state's `last_seq`, in seq order."""
        if records:
            self._body = None
        for r in records:
            self.state.apply(r)
        self._times(records)

    def body(self) -> tuple[bytes, bool]:
        """The answer as JSON bytes, and whether they were rendered now (not kept)."""
        if self._body is not None:
            return self._body, False
        # Rendered by Starlette's JSONResponse: the bytes the endpoint sent before.
        self._body = bytes(JSONResponse(self.to_json()).body)
        return self._body, True

    def _times(self, records: list[Record]) -> None:
        for r in records:
            if r.kind is RecordKind.WAVE_STARTED:
                self.started.setdefault(int(r.data.get("wave", -1)), r.ts)
            elif r.kind is RecordKind.WAVE_FINISHED:
                self.finished[int(r.data.get("wave", -1))] = r.ts
            self.recent.append(r)

    def to_json(self) -> dict[str, Any]:
        state = self.state
        gates_of: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for wave, g in state.gate_results:
            gates_of.setdefault((wave, g.device_id), []).append(g.to_json())
        waves = []
        for i, members in enumerate(state.waves):
            devices = []
            for d in members:
                dev = state.devices.get(d)
                devices.append(
                    {
                        "device_id": d,
                        "status": dev.status if dev else "pending",
                        "code": dev.code if dev else None,
                        "gates": gates_of.get((i, d), []),
                    }
                )
            result = state.waves_finished.get(i)
            waves.append(
                {
                    "index": i,
                    "devices": devices,
                    "started_at": self.started.get(i),
                    "finished_at": self.finished.get(i),
                    "passed": None if result is None else bool(result.get("passed")),
                }
            )
        halted = state.halted
        out: dict[str, Any] = _finite(
            {
                "rollout": state.to_json(),
                "waves": waves,
                "gates": [{"wave": w, **g.to_json()} for w, g in state.gate_results],
                "halt_reason": None if halted is None else str(halted.get("reason") or ""),
                "records": [record_json(r) for r in self.recent],
            }
        )
        return out


def rollout_json(records: list[Record]) -> dict[str, Any]:
    """The whole answer folded from scratch (what the cache must always equal)."""
    return FoldedRollout(records).to_json()


class RolloutCache:
    def __init__(self, store: Store, kept: int = KEPT) -> None:
        self.store, self.kept = store, kept
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, FoldedRollout] = OrderedDict()
        self.renders = 0  # answers serialised (the rest were the kept bytes)

    def body(self, rollout_id: str) -> bytes:
        """`GET /api/rollouts/{id}`'s JSON body, up to the record's last seq."""
        with self._lock:
            entry = self._entries.get(rollout_id)
            if entry is not None:
                self._entries.move_to_end(rollout_id)
        if entry is None:
            records = self.store.records(rollout_id=rollout_id)
            if not records:
                raise FleetError(
                    FleetCode.NOT_FOUND, f"no rollout {rollout_id[:80]!r} in the record"
                )
            entry = FoldedRollout(records)
            with self._lock:
                # Two first requests at once: keep one; either is complete.
                entry = self._entries.setdefault(rollout_id, entry)
                while len(self._entries) > self.kept:
                    self._entries.popitem(last=False)
        with entry.lock:  # one reader of the store and writer of the state at a time
            entry.add(self.store.records(rollout_id=rollout_id, after_seq=entry.state.last_seq))
            body, rendered = entry.body()
        if rendered:
            with self._lock:
                self.renders += 1
        return body


def record_json(r: Record) -> dict[str, Any]:
    out: dict[str, Any] = _finite(
        {
            "seq": r.seq,
            "ts": r.ts,
            "key_id": r.key_id,
            "operator": r.operator,
            "kind": str(r.kind),
            "rollout_id": r.rollout_id,
            "device_id": r.device_id,
            "result": r.result,
            "data": r.data,
        }
    )
    return out


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
