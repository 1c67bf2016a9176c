"""A rollout's whole state, folded from its records.

The driver only ever appends records and folds them; it keeps nothing else that
matters. So any console can show a rollout (`rollout show`), and another console can
take over a rollout whose driver died: it folds the same records and carries on.

Record data written by the engine (fleet/rollout/engine.py), by kind:

    rollout.created    plan, bundle {name, version, sha256, size, path}, targets, waves
    rollout.baseline   device: figures (fleet.rollout.gates.figures_of) before the update
    rollout.driver     holder, token (the lease's fencing token)
    wave.started       wave, devices
    device.started     device: wave, job, command
    device.outcome     device: wave, outcome, code, message    (result = outcome)
    gate.result        device: wave + GateResult.to_json()      (result = passed|failed)
    wave.finished      wave, succeeded, failed, skipped, success_pct, passed
    rollout.*_requested  reason (any console, no lease)
    rollout.paused / rollout.resumed
    rollout.halted     reason, cause (gate|success_threshold|abort_threshold|...), details
    device.rolled_back device: to_version, job, ok, code          (result = ok | code)
    rollout.finished   outcome (succeeded|halted|aborted|rolled_back), counts, reason
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import FleetCode, FleetError
from fleet.ports import Record, RecordKind
from fleet.rollout.gates import GateResult
from fleet.rollout.plan import RolloutPlan

# Device outcomes (DEVICE_OUTCOME result). "failed" and "timed_out" count as failures.
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
SKIPPED_OFFLINE = "skipped_offline"
ALREADY_CURRENT = "already_current"  # served this bundle before the rollout: left alone
OUTCOMES = (SUCCEEDED, FAILED, TIMED_OUT, SKIPPED_OFFLINE, ALREADY_CURRENT)
NOT_TRIED = (SKIPPED_OFFLINE, ALREADY_CURRENT)  # count in no threshold
FAILURES = (FAILED, TIMED_OUT)

# Final outcomes of a rollout (ROLLOUT_FINISHED result).
FINAL_SUCCEEDED = "succeeded"
FINAL_HALTED = "halted"
FINAL_ABORTED = "aborted"
FINAL_ROLLED_BACK = "rolled_back"


@dataclass
class DeviceState:
    device_id: str
    wave: int | None = None
    job: str | None = None
    command: str | None = None
    started_ts: float | None = None  # the store's clock when DEVICE_STARTED was written
    outcome: str | None = None  # one of OUTCOMES once known
    code: str | None = None  # why it failed (update.* / console.* code)
    message: str = ""
    rolled_back_to: str | None = None  # set once DEVICE_ROLLED_BACK said ok
    rollback_code: str | None = None  # a rollback that did not succeed
    rollback_done: bool = False  # a DEVICE_ROLLED_BACK was recorded (needed or not)

    @property
    def status(self) -> str:
        """pending | started | succeeded | failed | timed_out | skipped_offline |
        already_current | rolled_back | rollback_failed"""
        if self.rolled_back_to is not None:
            return "rolled_back"
        if self.rollback_code is not None:
            return "rollback_failed"
        if self.outcome is not None:
            return self.outcome
        return "started" if self.job is not None else "pending"

    @property
    def in_flight(self) -> bool:
        return self.job is not None and self.outcome is None

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "wave": self.wave,
            "status": self.status,
            "job": self.job,
            "outcome": self.outcome,
            "code": self.code,
            "message": self.message,
            "rolled_back_to": self.rolled_back_to,
            "rollback_code": self.rollback_code,
        }


@dataclass
class RolloutState:
    rollout_id: str
    plan: RolloutPlan
    bundle: dict[str, Any]
    targets: list[str]
    waves: list[list[str]]
    created_ts: float
    created_by: tuple[str, str]  # (key id, operator)
    devices: dict[str, DeviceState] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate_results: list[tuple[int, GateResult]] = field(default_factory=list)
    waves_started: int = 0  # waves [0, waves_started) were started
    waves_finished: dict[int, dict[str, Any]] = field(default_factory=dict)
    pause_requested: bool = False  # the latest of pause/resume requests was a pause
    paused: bool = False  # the driver said it paused (and has not resumed since)
    abort_requested: bool = False
    rollback_requested: bool = False
    halted: dict[str, Any] | None = None
    finished: str | None = None  # final outcome
    reason: str = ""
    driver: str | None = None  # the console that drives it (latest rollout.driver)
    last_seq: int = 0

    # ------------------------------------------------------------------ folding

    @classmethod
    def fold(cls, records: Iterable[Record]) -> RolloutState:
        it = iter(records)
        first = next(it, None)
        if first is None:
            raise FleetError(FleetCode.NOT_FOUND, "no records for this rollout")
        if first.kind is not RecordKind.ROLLOUT_CREATED:
            raise FleetError(
                FleetCode.STORE,
                f"rollout {first.rollout_id}: its first record is {first.kind.value}, "
                "not rollout.created (the record is damaged)",
            )
        data = first.data
        state = cls(
            rollout_id=str(first.rollout_id),
            plan=RolloutPlan.from_json(data["plan"]),
            bundle=dict(data["bundle"]),
            targets=list(data["targets"]),
            waves=[list(w) for w in data["waves"]],
            created_ts=first.ts,
            created_by=(first.key_id, first.operator),
            last_seq=first.seq,
        )
        for i, wave in enumerate(state.waves):
            for dev in wave:
                state.devices[dev] = DeviceState(dev, wave=i)
        for record in it:
            state.apply(record)
        return state

    def apply(self, r: Record) -> None:
        """Fold one more record (in seq order) into this state."""
        if r.seq <= self.last_seq:
            return  # already folded (a re-read overlapping the last one)
        self.last_seq = r.seq
        d: Mapping[str, Any] = r.data
        dev = self.devices.get(r.device_id) if r.device_id else None
        k = r.kind
        if k is RecordKind.ROLLOUT_BASELINE and r.device_id:
            self.baselines[r.device_id] = dict(d.get("figures", {}))
        elif k is RecordKind.DRIVER_TOOK_OVER:
            self.driver = str(d.get("holder"))
        elif k is RecordKind.WAVE_STARTED:
            self.waves_started = max(self.waves_started, int(d["wave"]) + 1)
        elif k is RecordKind.DEVICE_STARTED and dev is not None:
            dev.job, dev.command, dev.started_ts = d.get("job"), d.get("command"), r.ts
        elif k is RecordKind.DEVICE_OUTCOME and dev is not None:
            dev.outcome = str(r.result or d.get("outcome"))
            dev.code, dev.message = d.get("code"), str(d.get("message", ""))
        elif k is RecordKind.GATE_RESULT:
            self.gate_results.append((int(d.get("wave", -1)), GateResult.from_json(d)))
        elif k is RecordKind.WAVE_FINISHED:
            self.waves_finished[int(d["wave"])] = dict(d)
        elif k is RecordKind.PAUSE_REQUESTED:
            self.pause_requested = True
        elif k is RecordKind.RESUME_REQUESTED:
            self.pause_requested = False
        elif k is RecordKind.ABORT_REQUESTED:
            self.abort_requested = True
        elif k is RecordKind.ROLLBACK_REQUESTED:
            self.rollback_requested = True
            if self.finished in (FINAL_SUCCEEDED, FINAL_ABORTED):
                # Rolling back a finished rollout reopens it until the devices are back.
                self.finished = None
        elif k is RecordKind.ROLLOUT_PAUSED:
            self.paused = True
        elif k is RecordKind.ROLLOUT_RESUMED:
            self.paused = False
        elif k is RecordKind.ROLLOUT_HALTED:
            self.halted = dict(d)
            self.reason = str(d.get("reason", ""))
        elif k is RecordKind.DEVICE_ROLLED_BACK and dev is not None:
            dev.rollback_done = True
            if not d.get("ok"):
                dev.rollback_code = str(d.get("code") or "failed")
            elif d.get("needed", True):
                dev.rolled_back_to, dev.rollback_code = str(d.get("to_version")), None
        elif k is RecordKind.ROLLOUT_FINISHED:
            self.finished = str(r.result or d.get("outcome"))
            self.reason = str(d.get("reason", self.reason))

    # ---------------------------------------------------------------- questions

    @property
    def version(self) -> str:
        return str(self.bundle["version"])

    @property
    def phase(self) -> str:
        """created | running | paused | halting | rolling_back | aborting | finished"""
        if self.finished is not None:
            return "finished"
        if self.halted is not None:
            return "halting"
        if self.rollback_requested:
            return "rolling_back"
        if self.abort_requested:
            return "aborting"
        if self.paused:
            return "paused"
        return "running" if self.waves_started else "created"

    def counts(self) -> dict[str, int]:
        c = Counter(dev.status for dev in self.devices.values())
        return {status: c[status] for status in sorted(c)}

    def wave_devices(self, wave: int) -> list[DeviceState]:
        return [self.devices[d] for d in self.waves[wave]]

    def in_flight(self) -> list[DeviceState]:
        return [d for d in self.devices.values() if d.in_flight]

    def failure_share(self) -> tuple[int, int]:
        """(failed, finished) over the whole rollout, for the abort threshold.
        Devices skipped offline were never updated: they count in neither."""
        finished = [d for d in self.devices.values() if d.outcome in (SUCCEEDED, *FAILURES)]
        return sum(1 for d in finished if d.outcome in FAILURES), len(finished)

    def to_rollback(self) -> list[DeviceState]:
        """Devices this rollout may have changed and that are not back yet: those that
        succeeded, and those that timed out (their job may have swapped late)."""
        return [
            d
            for d in self.devices.values()
            if d.outcome in (SUCCEEDED, TIMED_OUT) and not d.rollback_done
        ]

    def failed_gates(self) -> list[GateResult]:
        return [g for _, g in self.gate_results if not g.passed]

    def summary(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "phase": self.phase,
            "outcome": self.finished,
            "reason": self.reason,
            "bundle": {k: self.bundle.get(k) for k in ("name", "version", "sha256", "size")},
            "targets": len(self.targets),
            "waves": [len(w) for w in self.waves],
            "waves_started": self.waves_started,
            "waves_finished": len(self.waves_finished),
            "devices": self.counts(),
            "failed_gates": [g.to_json() for g in self.failed_gates()],
            "driver": self.driver,
            "paused": self.paused,
        }

    def to_json(self) -> dict[str, Any]:
        out = self.summary()
        out["plan"] = self.plan.to_json()
        out["created_ts"] = self.created_ts
        out["created_by"] = {"key_id": self.created_by[0], "operator": self.created_by[1]}
        out["halted"] = self.halted
        out["wave_results"] = [self.waves_finished[i] for i in sorted(self.waves_finished)]
        out["gate_results"] = [{"wave": w, **g.to_json()} for w, g in self.gate_results]
        out["device_states"] = [self.devices[d].to_json() for d in sorted(self.devices)]
        return out
