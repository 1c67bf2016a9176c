"""Progress of a rollout as it happens: one line per wave, device outcome, gate and
decision (JSON lines with `--json`), printed from the records the driver folds, so what
the operator reads is exactly what was recorded."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from fleet.ports import Record, RecordKind
from fleet.rollout.gates import GateResult
from fleet.rollout.state import RolloutState


def record_json(r: Record) -> dict[str, Any]:
    return {
        "seq": r.seq,
        "ts": r.ts,
        "kind": r.kind.value,
        "rollout_id": r.rollout_id,
        "device_id": r.device_id,
        "result": r.result,
        "key_id": r.key_id,
        "operator": r.operator,
        "data": dict(r.data),
    }


def describe(r: Record, state: RolloutState) -> str | None:
    """The human line for one record, or None for records not worth a line."""
    d, k, dev = r.data, r.kind, r.device_id
    nwaves = len(state.waves)
    if k is RecordKind.ROLLOUT_CREATED:
        b = d["bundle"]
        sizes = ", ".join(str(len(w)) for w in d["waves"])
        return (
            f"rollout {r.rollout_id}: {b['name']} {b['version']} to {len(d['targets'])} "
            f"device(s) in {len(d['waves'])} wave(s) [{sizes}]"
        )
    if k is RecordKind.DRIVER_TOOK_OVER:
        return f"driven by {d.get('holder')} (operator {r.operator})"
    if k is RecordKind.WAVE_STARTED:
        label = "canary" if d["wave"] == 0 else f"wave {d['wave']}/{nwaves - 1}"
        return f"{label}: {len(d['devices'])} device(s)"
    if k is RecordKind.DEVICE_OUTCOME:
        outcome = str(r.result)
        code = f" [{d['code']}]" if d.get("code") else ""
        ok = ("succeeded", "skipped_offline", "already_current")
        shown = outcome if outcome in ok else outcome.upper()
        return f"  {dev}: {shown}{code} {d.get('message', '')}".rstrip()
    if k is RecordKind.GATE_RESULT:
        return "  gate " + GateResult.from_json(d).describe()
    if k is RecordKind.WAVE_FINISHED:
        verdict = "passed" if d.get("passed") else "FAILED"
        return (
            f"wave {d['wave']} {verdict}: {d['succeeded']} succeeded, {d['failed']} failed, "
            f"{d['skipped']} not tried (offline or already current) ({d['success_pct']:g}% success)"
        )
    if k is RecordKind.ROLLOUT_HALTED:
        return f"HALTED ({d.get('cause')}): {d.get('reason')}; rolling back the updated devices"
    if k is RecordKind.DEVICE_ROLLED_BACK:
        if not d.get("ok"):
            return f"  {dev}: ROLLBACK FAILED [{d.get('code')}] {d.get('message', '')}".rstrip()
        if not d.get("needed", True):
            return f"  {dev}: no rollback needed ({d.get('message')})"
        return f"  {dev}: rolled back to {d.get('to_version')}"
    if k is RecordKind.ROLLOUT_FINISHED:
        return f"rollout {r.rollout_id} {r.result}: {d.get('reason', '')}"
    if k in (
        RecordKind.PAUSE_REQUESTED,
        RecordKind.RESUME_REQUESTED,
        RecordKind.ABORT_REQUESTED,
        RecordKind.ROLLBACK_REQUESTED,
    ):
        return f"{k.value.split('.')[1].replace('_', ' ')} by {r.operator} ({r.key_id})"
    if k is RecordKind.ROLLOUT_PAUSED:
        return f"paused: {d.get('in_flight', 0)} device(s) still finishing; no new ones start"
    if k is RecordKind.ROLLOUT_RESUMED:
        return "resumed"
    return None


class Printer:
    """Prints records (and the driver's notes) as lines or JSON lines."""

    def __init__(self, json_lines: bool, out: TextIO | None = None) -> None:
        self.json = json_lines
        self.out = out or sys.stdout

    def record(self, r: Record, state: RolloutState) -> None:
        if self.json:
            line = json.dumps(record_json(r), sort_keys=True)
        else:
            text = describe(r, state)
            if text is None:
                return
            line = text
        print(line, file=self.out, flush=True)

    def note(self, text: str) -> None:
        if self.json:
            print(json.dumps({"note": text}), file=self.out, flush=True)
        else:
            print(f"  ({text})", file=self.out, flush=True)
