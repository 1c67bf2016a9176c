"""The fold of a rollout's records: what `rollout show` and a resuming driver rely on."""

from __future__ import annotations

import io
import itertools
import json
from typing import Any

import pytest

from fleet.errors import FleetCode, FleetError
from fleet.ports import Record, RecordKind
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.progress import Printer
from fleet.rollout.state import RolloutState

RID = "r-test"
_seq = itertools.count(1)


def rec(kind: RecordKind, data: dict[str, Any] | None = None, device: str | None = None,
        result: str | None = None) -> Record:  # fmt: skip
    return Record(next(_seq), 0.0, "key", "op", kind, data or {}, RID, device, result)


def created(devices: list[str]) -> list[Record]:
    plan = RolloutPlan(targets=("all",), canary=1, wave="50%")
    waves = plan.waves(devices)
    bundle = {"name": "m", "version": "2.0.0", "sha256": "a" * 64, "size": 1, "path": "/x"}
    return [
        rec(
            RecordKind.ROLLOUT_CREATED,
            {"plan": plan.to_json(), "bundle": bundle, "targets": devices, "waves": waves},
        ),
        *[rec(RecordKind.ROLLOUT_BASELINE, {"figures": {"version": "1.0.0"}}, d) for d in devices],
    ]


def test_fold_follows_devices_through_a_halt_and_rollback() -> None:
    records = created(["a", "b", "c"])
    records += [
        rec(RecordKind.WAVE_STARTED, {"wave": 0, "devices": ["a"]}),
        rec(RecordKind.DEVICE_STARTED, {"wave": 0, "job": "j1"}, "a", "started"),
    ]
    mid = RolloutState.fold(records)
    assert mid.phase == "running" and [d.device_id for d in mid.in_flight()] == ["a"]
    assert mid.devices["b"].status == "pending" and mid.baselines["a"] == {"version": "1.0.0"}
    records += [
        rec(RecordKind.DEVICE_OUTCOME, {"wave": 0, "outcome": "succeeded"}, "a", "succeeded"),
        rec(
            RecordKind.GATE_RESULT,
            {
                "wave": 0,
                "device_id": "a",
                "gate": "p95_ms<=1.2x",
                "metric": "p95_ms",
                "figure": 3.0,
                "baseline": 2.0,
                "limit": 2.4,
                "passed": False,
            },
            "a",
            "failed",
        ),
        rec(RecordKind.ROLLOUT_HALTED, {"cause": "gate", "reason": "a: p95"}),
    ]
    halted = RolloutState.fold(records)
    assert halted.phase == "halting" and [d.device_id for d in halted.to_rollback()] == ["a"]
    assert [g.device_id for g in halted.failed_gates()] == ["a"]
    records += [
        rec(RecordKind.DEVICE_ROLLED_BACK, {"ok": True, "to_version": "1.0.0"}, "a", "ok"),
        rec(RecordKind.ROLLOUT_FINISHED, {"outcome": "halted", "reason": "a: p95"}, None, "halted"),
    ]
    done = RolloutState.fold(records)
    assert done.finished == "halted" and done.phase == "finished"
    assert done.counts() == {"pending": 2, "rolled_back": 1} and not done.to_rollback()


def test_pause_resume_and_a_rollback_that_reopens_a_finished_rollout() -> None:
    records = created(["a"])
    records.append(rec(RecordKind.PAUSE_REQUESTED))
    s = RolloutState.fold(records)
    assert s.pause_requested and not s.paused  # asked; the driver has not obeyed yet
    records += [rec(RecordKind.ROLLOUT_PAUSED), rec(RecordKind.RESUME_REQUESTED)]
    s = RolloutState.fold(records)
    assert s.paused and not s.pause_requested
    records += [
        rec(RecordKind.ROLLOUT_RESUMED),
        rec(RecordKind.DEVICE_OUTCOME, {"outcome": "succeeded"}, "a", "succeeded"),
        rec(RecordKind.ROLLOUT_FINISHED, {"outcome": "succeeded"}, None, "succeeded"),
    ]
    assert RolloutState.fold(records).finished == "succeeded"
    records.append(rec(RecordKind.ROLLBACK_REQUESTED))
    reopened = RolloutState.fold(records)
    assert reopened.finished is None and reopened.phase == "rolling_back"
    assert [d.device_id for d in reopened.to_rollback()] == ["a"]


def test_incremental_apply_equals_a_whole_fold_and_ignores_repeats() -> None:
    records = [*created(["a", "b"]), rec(RecordKind.WAVE_STARTED, {"wave": 0, "devices": ["a"]})]
    state = RolloutState.fold(records[:1])
    for r in [*records[1:], *records[1:]]:  # a re-read that overlaps is harmless
        state.apply(r)
    assert state.to_json() == RolloutState.fold(records).to_json()


def test_a_record_that_does_not_start_with_created_is_refused() -> None:
    with pytest.raises(FleetError) as info:
        RolloutState.fold([rec(RecordKind.WAVE_STARTED, {"wave": 0})])
    assert info.value.code is FleetCode.STORE
    with pytest.raises(FleetError) as none:
        RolloutState.fold([])
    assert none.value.code is FleetCode.NOT_FOUND


def test_progress_lines_say_what_happened_with_the_figures() -> None:
    records = created(["a", "b"])
    records += [
        rec(RecordKind.WAVE_STARTED, {"wave": 0, "devices": ["a"]}),
        rec(
            RecordKind.DEVICE_OUTCOME,
            {"outcome": "failed", "code": "update.trial_failed", "message": "rolled_back: p95"},
            "a",
            "failed",
        ),
        rec(
            RecordKind.GATE_RESULT,
            {
                "device_id": "a",
                "gate": "p95_ms<=1.2x",
                "metric": "p95_ms",
                "figure": 3.0,
                "baseline": 2.0,
                "limit": 2.4,
                "passed": False,
            },
            "a",
            "failed",
        ),
        rec(
            RecordKind.WAVE_FINISHED,
            {
                "wave": 0,
                "succeeded": 0,
                "failed": 1,
                "skipped": 0,
                "success_pct": 0.0,
                "passed": False,
            },
        ),
        rec(RecordKind.ROLLOUT_HALTED, {"cause": "gate", "reason": "a: p95"}),
        rec(RecordKind.DEVICE_ROLLED_BACK, {"ok": True, "to_version": "1.0.0"}, "a", "ok"),
        rec(RecordKind.ROLLOUT_FINISHED, {"outcome": "halted", "reason": "a: p95"}, None, "halted"),
    ]
    state = RolloutState.fold(records)
    out = io.StringIO()
    printer = Printer(False, out)
    for r in records:
        printer.record(r, state)
    text = out.getvalue()
    assert "rollout r-test: m 2.0.0 to 2 device(s) in 2 wave(s) [1, 1]" in text
    assert "canary: 1 device(s)" in text
    assert "  a: FAILED [update.trial_failed] rolled_back: p95" in text
    assert "gate a: p95_ms<=1.2x FAILED: 3 vs limit 2.4 (baseline 2)" in text
    assert "wave 0 FAILED: 0 succeeded, 1 failed" in text
    assert "HALTED (gate): a: p95" in text and "  a: rolled back to 1.0.0" in text
    assert "rollout r-test halted: a: p95" in text
    assert "rollout.baseline" not in text  # baselines are in the record, not on screen
    lines = io.StringIO()
    Printer(True, lines).record(records[-1], state)
    doc = json.loads(lines.getvalue())
    assert doc["kind"] == "rollout.finished" and doc["result"] == "halted"
