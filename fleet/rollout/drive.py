"""One drive of one rollout under one lease: the tick loop of fleet/rollout/engine.py.

Each tick: renew the lease, poll what is in flight (deploy and rollback replies, job
phases from `update.*` events or the retained state, `update.status` answers,
timeouts), decide, append the decisions in one transaction under the lease, and read
back every record after the last one folded (other consoles' requests included).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.protocol.messages import Reply
from agent.protocol.update import DeployRequest, Phase, ShadowSpec
from fleet.errors import FleetCode, FleetError
from fleet.ports import Lease, NewRecord, Record, RecordKind
from fleet.rollout.bundle import BundleInfo
from fleet.rollout.gates import GateResult, evaluate, figures_of, is_new_model
from fleet.rollout.sources import DeploySource
from fleet.rollout.state import (
    ALREADY_CURRENT,
    FAILED,
    FINAL_ABORTED,
    FINAL_HALTED,
    FINAL_ROLLED_BACK,
    FINAL_SUCCEEDED,
    NOT_TRIED,
    SKIPPED_OFFLINE,
    SUCCEEDED,
    TIMED_OUT,
    DeviceState,
    RolloutState,
)

if TYPE_CHECKING:
    from fleet.rollout.engine import RolloutEngine

_FINAL_PHASES = {p.value for p in Phase if p.final}
ROW_CHECK_S = 1.0  # how often the retained state is read for jobs whose event is missing
MIN_STEP_S = 0.05  # the shortest time between two steps


@dataclass
class _Rollback:
    future: Future[Reply] | None
    job: str | None
    since: float
    to_version: str | None


class Drive:
    """One drive of one rollout, under one lease."""

    def __init__(
        self, engine: RolloutEngine, rollout_id: str, lease: Lease, bundle_path: str | None
    ) -> None:
        self.e = engine
        self.rid = rollout_id
        self.lease = lease
        self.renewed = time.monotonic()
        self.bundle_path = bundle_path
        self.batch: list[NewRecord] = []
        self.deploys: dict[str, Future[Reply]] = {}
        self.status_asks: dict[str, Future[Reply]] = {}
        self.watch_since: dict[str, float] = {}
        self.asked_at_timeout: set[str] = set()
        self.soak_until: dict[int, float] = {}
        self.rollbacks: dict[str, _Rollback] = {}
        self.notes: set[str] = set()
        self.source: DeploySource | None = None
        self._finals: dict[tuple[str, str], tuple[str, str | None, str]] = {}
        self._telemetry_at: dict[str, float] = {}  # device -> monotonic time of its last report
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._rows_checked = 0.0
        self.use_rows = True  # this step also reads the retained state (see _rows_due)
        self._remove_listener = engine.view.add_listener(self._on_view)
        records = engine.store.records(rollout_id=rollout_id)
        self.state = RolloutState.fold(records)
        self._report(records)

    # ----------------------------------------------------------------- plumbing

    def close(self) -> None:
        self._remove_listener()
        if self.source is not None:
            with contextlib.suppress(Exception):
                self.source.close()
        with contextlib.suppress(Exception):
            self.e.store.release_lease(self.lease)

    def _on_view(self, kind: str, device_id: str, message: Any) -> None:
        # On the MQTT thread: note telemetry arrivals and final update phases only.
        if kind == "telemetry":
            self._telemetry_at[device_id] = time.monotonic()
            return
        if kind != "event":
            return
        event_kind = _field(message, "kind")
        if not isinstance(event_kind, str) or not event_kind.startswith("update."):
            return
        phase = event_kind[len("update.") :]
        data = _field(message, "data") or {}
        job = data.get("job") if isinstance(data, dict) else None
        if phase in _FINAL_PHASES and isinstance(job, str):
            code = data.get("code")
            reason = _field(message, "reason") or ""
            with self._lock:
                self._finals[(device_id, job)] = (phase, code, str(reason))
            self._wake.set()

    def _final_of(
        self, device: str, job: str | None, use_row: bool = True
    ) -> tuple[str, str | None, str] | None:
        """The job's final phase: from its event, else (`use_row`) the retained state."""
        if job is None:
            return None
        with self._lock:
            seen = self._finals.get((device, job))
        if seen is not None or not use_row:
            return seen
        row = self.e.view.row(device)
        if row is not None and row.job == job and row.phase in _FINAL_PHASES:
            return (str(row.phase), None, "")
        return None

    def _note(self, text: str, once: str | None = None) -> None:
        if once is not None:
            if once in self.notes:
                return
            self.notes.add(once)
        if self.e.on_note is not None:
            self.e.on_note(text)

    def _report(self, records: Iterable[Record]) -> None:
        if self.e.on_record is None:
            return
        for r in records:
            self.e.on_record(r, self.state)

    def _add(
        self,
        kind: RecordKind,
        data: dict[str, Any],
        device: str | None = None,
        result: str | None = None,
    ) -> None:
        self.batch.append(
            NewRecord(kind, data, rollout_id=self.rid, device_id=device, result=result)
        )

    def _flush(self) -> None:
        """Append what this tick decided (one transaction, under the lease), then read
        back everything new: ours and other consoles' records, in seq order."""
        if self.batch:
            entries, self.batch = self.batch, []
            self.e.store.append(entries, who=self.e.who, lease=self.lease)
        self._read()

    def _read(self) -> None:
        new = self.e.store.records(rollout_id=self.rid, after_seq=self.state.last_seq)
        for r in new:
            self.state.apply(r)
        self._report(new)

    def _renew(self) -> None:
        if time.monotonic() - self.renewed >= self.e.lease_ttl_s / 3:
            self.lease = self.e.store.renew_lease(self.lease, self.e.lease_ttl_s)
            self.renewed = time.monotonic()

    # --------------------------------------------------------------------- loop

    def run(self) -> RolloutState:
        s = self.state
        if s.finished is not None:
            return s
        self._add(RecordKind.DRIVER_TOOK_OVER, {"holder": self.e.holder, "token": self.lease.token})
        # Devices that were mid-update under a previous driver: ask for their job.
        for dev in s.in_flight():
            self.status_asks[dev.device_id] = self.e.commander.submit(
                dev.device_id, "update.status", {}, timeout_s=self.e.command_timeout_s
            )
        self._flush()
        while self.state.finished is None:
            began = time.monotonic()
            self._renew()
            self._step()
            if self.state.finished is None:
                # An event wakes the loop early, but steps stay MIN_STEP_S apart: a wave
                # of thousands of final events must not become thousands of steps.
                self._wake.wait(self.e.tick_s)
                self._wake.clear()
                rest = began + min(MIN_STEP_S, self.e.tick_s) - time.monotonic()
                if rest > 0:
                    time.sleep(rest)
        return self.state

    def _step(self) -> None:
        s = self.state
        self.use_rows = self._rows_due()
        self._poll_deploys()
        self._poll_status_asks()
        self._poll_jobs()
        self._flush()
        if s.halted is not None or s.rollback_requested or s.abort_requested:
            self._wind_down()
            self._flush()
            return
        if self._abort_threshold():
            self._flush()
            return
        if s.pause_requested and not s.paused:
            self._add(RecordKind.ROLLOUT_PAUSED, {"in_flight": len(s.in_flight())})
        elif not s.pause_requested and s.paused:
            self._add(RecordKind.ROLLOUT_RESUMED, {})
        self._flush()
        current = s.waves_started - 1
        if current >= 0 and current not in s.waves_finished:
            self._start_pending(current)
            self._flush()
            self._close_wave(current)
        elif not s.paused:
            if s.waves_started < len(s.waves):
                wave = s.waves_started
                self._add(RecordKind.WAVE_STARTED, {"wave": wave, "devices": s.waves[wave]})
            else:
                counts = s.counts()
                skipped = counts.get(SKIPPED_OFFLINE, 0)
                on_it = counts.get(ALREADY_CURRENT, 0)
                self._finish(
                    FINAL_SUCCEEDED,
                    f"{counts.get(SUCCEEDED, 0)} device(s) updated to {s.version}"
                    + (f", {skipped} skipped offline (not updated)" if skipped else "")
                    + (f", {on_it} already on it" if on_it else ""),
                )
        self._flush()

    # ------------------------------------------------------------ starting devices

    def _bundle(self) -> BundleInfo:
        info = BundleInfo.from_json(self.state.bundle)
        if self.bundle_path is not None:
            info = BundleInfo(self.bundle_path, info.name, info.version, info.sha256, info.size)
        return info

    def _deploy_args(self, device: str) -> dict[str, Any]:
        """FleetError from the source's `source_for` (the device cannot be served)."""
        plan, bundle = self.state.plan, self._bundle()
        if self.source is None:
            self.source = self.e.sources(plan.via, bundle)
        source = self.source
        try:
            where = source.source_for(device)
        except FleetError as exc:
            raise _NotServed(exc) from None
        request = DeployRequest(
            source=where,
            sha256=bundle.sha256,
            size=bundle.size,
            version=bundle.version,
            name=bundle.name,
            shadow=ShadowSpec() if plan.shadow else None,
        )
        args = request.to_args()
        if plan.trial_window_s is not None:
            # Only the window: the device's own [update.trial] bounds stay in force.
            args["trial"] = {"window_s": plan.trial_window_s}
        return args

    def _start_pending(self, wave: int) -> None:
        s = self.state
        if s.paused or s.pause_requested:
            return
        now = time.time()
        for dev in s.wave_devices(wave):
            if (
                dev.status != "pending"
                or dev.device_id in self.deploys
                or dev.device_id in self.status_asks  # busy: asking which job it runs
            ):
                continue
            if s.baselines.get(dev.device_id, {}).get("sha256") == s.bundle["sha256"]:
                self._outcome(dev, ALREADY_CURRENT, None, "served this bundle before the rollout")
                continue
            row = self.e.view.row(dev.device_id)
            if row is None or row.online is not True:
                since = "" if row is None or row.since is None else f" since {row.since:.0f}"
                self._outcome(dev, SKIPPED_OFFLINE, None, f"offline when its wave started{since}")
                continue
            if not s.plan.window_open(row.groups, now):
                self._note(
                    f"wave {wave}: {dev.device_id} waits for its group's maintenance window",
                    once=f"window:{dev.device_id}",
                )
                continue
            try:
                args = self._deploy_args(dev.device_id)
            except _NotServed as exc:
                # Nothing was sent, so nothing to roll back: the normal failure handling
                # (thresholds, halt) runs now instead of after the device timeout.
                err = exc.error
                self._outcome(dev, FAILED, err.code.value, f"deploy not sent: {err.message}")
                continue
            self.deploys[dev.device_id] = self.e.commander.submit(
                dev.device_id, "deploy", args, timeout_s=self.e.command_timeout_s
            )

    def _outcome(self, dev: DeviceState, outcome: str, code: str | None, message: str) -> None:
        if self.source is not None:
            self.source.done(dev.device_id)
        self._add(
            RecordKind.DEVICE_OUTCOME,
            {
                "wave": dev.wave,
                "outcome": outcome,
                "code": code,
                "message": message,
                "job": dev.job,
            },
            dev.device_id,
            outcome,
        )

    def _poll_deploys(self) -> None:
        for device, future in list(self.deploys.items()):
            if not future.done():
                continue
            del self.deploys[device]
            dev = self.state.devices[device]
            try:
                reply = future.result()
            except FleetError as exc:
                if exc.code is FleetCode.OFFLINE:  # went offline since: nothing was sent
                    self._outcome(dev, SKIPPED_OFFLINE, None, f"offline: {exc.message}")
                    continue
                outcome = TIMED_OUT if exc.code is FleetCode.TIMEOUT else FAILED
                self._outcome(dev, outcome, exc.code.value, f"deploy: {exc.message}")
                continue
            if reply.ok:
                result = reply.result if isinstance(reply.result, dict) else {}
                self._started(dev, result.get("job"), reply.id)
                continue
            code = reply.error.code if reply.error else "command.failed"
            message = reply.error.message if reply.error else ""
            row = self.e.view.row(device)
            if code == "update.busy":
                # Perhaps our own deploy, sent by a driver that died before recording it.
                self.status_asks[device] = self.e.commander.submit(
                    device, "update.status", {}, timeout_s=self.e.command_timeout_s
                )
                self._note(f"{device}: busy with a job; asking which ({message})")
            elif (
                code == "update.not_newer"
                and row
                and row.model_sha256 == self.state.bundle["sha256"]
            ):
                self._outcome(dev, SUCCEEDED, None, "already serves this bundle")
            else:
                self._outcome(dev, FAILED, code, f"deploy refused: {message}")

    def _started(self, dev: DeviceState, job: object, command: str | None) -> None:
        self._add(
            RecordKind.DEVICE_STARTED,
            {"wave": dev.wave, "job": job, "command": command},
            dev.device_id,
            "started",
        )
        self.watch_since[dev.device_id] = time.monotonic()

    def _poll_status_asks(self) -> None:
        for device, future in list(self.status_asks.items()):
            if not future.done():
                continue
            del self.status_asks[device]
            dev = self.state.devices[device]
            try:
                reply = future.result()
            except FleetError as exc:
                self._note(f"{device}: update.status not answered ({exc.message}); watching on")
                continue
            result = reply.result if reply.ok and isinstance(reply.result, dict) else {}
            job = result.get("job") if isinstance(result.get("job"), dict) else None
            if job is None:
                continue
            job_id, phase = job.get("id"), job.get("phase")
            if dev.job is None and dev.outcome is None:
                # A busy device: adopt the job when it installs our version.
                if job.get("kind") == "deploy" and job.get("version") == self.state.version:
                    self._started(dev, job_id, None)
                    if phase in _FINAL_PHASES:
                        with self._lock:
                            self._finals[(device, str(job_id))] = (
                                str(phase),
                                job.get("code"),
                                str(job.get("reason") or ""),
                            )
                else:
                    self._outcome(dev, FAILED, "update.busy", f"busy with job {job_id} ({phase})")
                continue
            if job_id == dev.job and phase in _FINAL_PHASES:
                with self._lock:
                    self._finals[(device, str(job_id))] = (
                        str(phase),
                        job.get("code"),
                        str(job.get("reason") or ""),
                    )

    def _rows_due(self) -> bool:
        """The retained state is the fallback for a lost event: looked at about once a
        second, not every tick (a wave of thousands would rebuild thousands of rows)."""
        now = time.monotonic()
        if now - self._rows_checked < ROW_CHECK_S:
            return False
        self._rows_checked = now
        return True

    def _poll_jobs(self) -> None:
        now = time.monotonic()
        use_row = self.use_rows
        for dev in self.state.in_flight():
            final = self._final_of(dev.device_id, dev.job, use_row)
            if final is not None:
                phase, code, reason = final
                if phase == Phase.COMMITTED.value:
                    self._outcome(dev, SUCCEEDED, None, "committed")
                else:
                    self._outcome(dev, FAILED, code or f"update.{phase}", f"{phase}: {reason}")
                continue
            since = self.watch_since.setdefault(dev.device_id, now)
            timeout = self.state.plan.device_timeout_s
            if now - since > timeout:
                if dev.device_id not in self.asked_at_timeout:
                    # Its final event may have been lost: ask once before giving up.
                    self.asked_at_timeout.add(dev.device_id)
                    self.status_asks[dev.device_id] = self.e.commander.submit(
                        dev.device_id, "update.status", {}, timeout_s=self.e.command_timeout_s
                    )
                    continue
                if dev.device_id in self.status_asks:
                    continue  # its answer comes first
                row = self.e.view.row(dev.device_id)
                last = row.phase if row is not None and row.job == dev.job else "unknown"
                self._outcome(
                    dev,
                    TIMED_OUT,
                    "update.device_timeout",
                    f"no final phase within {timeout:g} s (last phase seen: {last})",
                )
                # Stop the stuck job so it cannot swap later behind the rollout's back;
                # its reply does not matter (a halt checks what the device serves).
                self.e.commander.submit(
                    dev.device_id, "update.cancel", {}, timeout_s=self.e.command_timeout_s
                )

    # ------------------------------------------------------------- closing waves

    def _abort_threshold(self) -> bool:
        s = self.state
        threshold = s.plan.abort_threshold
        if threshold is None:
            return False
        failed, finished = s.failure_share()
        if failed == 0 or finished < max(1, s.plan.abort_min_finished):
            return False
        share = 100.0 * failed / finished
        if share < threshold:
            return False
        bad = [d for d in s.devices.values() if d.outcome in (FAILED, TIMED_OUT)]
        self._halt(
            "abort_threshold",
            f"{failed} of {finished} finished devices failed ({share:.0f}%), at or above the "
            f"{threshold:g}% abort threshold",
            [{"device_id": d.device_id, "outcome": d.outcome, "code": d.code} for d in bad],
        )
        return True

    def _close_wave(self, wave: int) -> None:
        s = self.state
        devices = s.wave_devices(wave)
        if any(d.outcome is None for d in devices):
            return
        succeeded = [d for d in devices if d.outcome == SUCCEEDED]
        now = time.monotonic()
        if wave not in self.soak_until:
            soak = s.plan.soak_s if succeeded and s.plan.gates else 0.0
            self.soak_until[wave] = now + soak
            if soak:
                self._note(f"wave {wave}: soaking {soak:g} s before the gates")
        if now < self.soak_until[wave]:
            return
        results = [r for d in succeeded for r in self._gates(d)]
        # A device short of data whose last telemetry predates the soak's end is asked
        # again on later ticks (bounded): its next report covers the soak.
        soak_end = self.soak_until[wave]
        stale = {
            r.device_id
            for r in results
            if r.inconclusive and self._telemetry_at.get(r.device_id, -1.0) < soak_end
        }
        if stale and now < soak_end + self.e.gate_wait_s:
            self._note(
                f"wave {wave}: waiting for fresh telemetry from {len(stale)} device(s) "
                f"(at most {self.e.gate_wait_s:g} s)",
                once=f"stale:{wave}",
            )
            return
        for r in results:
            self._add(
                RecordKind.GATE_RESULT,
                {"wave": wave, **r.to_json()},
                r.device_id,
                "inconclusive"
                if r.inconclusive and not r.passed
                else ("passed" if r.passed else "failed"),
            )
        reached = [d for d in devices if d.outcome not in NOT_TRIED]
        share = 100.0 * len(succeeded) / len(reached) if reached else 100.0
        failed_gates = [r for r in results if not r.passed]
        passed = not failed_gates and share >= s.plan.success_threshold
        self._add(
            RecordKind.WAVE_FINISHED,
            {
                "wave": wave,
                "devices": len(devices),
                "succeeded": len(succeeded),
                "failed": len(reached) - len(succeeded),
                "skipped": len(devices) - len(reached),
                "success_pct": round(share, 2),
                "gates_failed": len(failed_gates),
                "passed": passed,
            },
            result="passed" if passed else "failed",
        )
        if failed_gates:
            first = failed_gates[0]
            others = len(failed_gates) - 1
            self._halt(
                "gate",
                f"gate {first.describe()}" + (f" (and {others} more)" if others else ""),
                [r.to_json() for r in failed_gates],
            )
        elif share < s.plan.success_threshold:
            bad = [d for d in reached if d.outcome != SUCCEEDED]
            self._halt(
                "success_threshold",
                f"wave {wave}: {len(succeeded)} of {len(reached)} device(s) succeeded "
                f"({share:.0f}%), below the {s.plan.success_threshold:g}% success threshold",
                [{"device_id": d.device_id, "outcome": d.outcome, "code": d.code} for d in bad],
            )

    def _gates(self, dev: DeviceState) -> list[GateResult]:
        s = self.state
        row = self.e.view.row(dev.device_id)
        after = figures_of(row) if row is not None else {}
        baseline = s.baselines.get(dev.device_id, {})
        fresh = is_new_model(after, baseline, s.version)
        return [
            evaluate(
                gate,
                dev.device_id,
                after,
                baseline,
                min_requests=s.plan.gate_min_requests,
                allow_no_data=s.plan.allow_no_data,
                fresh=fresh,
            )
            for gate in s.plan.gates
        ]

    def _halt(self, cause: str, reason: str, details: list[dict[str, Any]]) -> None:
        self._add(
            RecordKind.ROLLOUT_HALTED,
            {"cause": cause, "reason": reason, "details": details},
            result=cause,
        )

    def _finish(self, outcome: str, reason: str) -> None:
        self._add(
            RecordKind.ROLLOUT_FINISHED,
            {"outcome": outcome, "reason": reason, "devices": self.state.counts()},
            result=outcome,
        )

    # ------------------------------------------------------- halts and rollbacks

    def _wind_down(self) -> None:
        s = self.state
        if self.deploys or s.in_flight():
            self._note("stopping: waiting for the devices mid-update to finish", once="drain")
            return
        if s.halted is None and not s.rollback_requested:
            self._finish(FINAL_ABORTED, "aborted on request; devices not reached were not touched")
            return
        for dev in s.to_rollback():
            if dev.device_id not in self.rollbacks:
                self._send_rollback(dev)
        self._poll_rollbacks()
        self._flush()
        if not self.rollbacks and not s.to_rollback():
            rolled = s.counts().get("rolled_back", 0)
            if s.halted is not None:
                self._finish(FINAL_HALTED, f"{s.reason}; {rolled} device(s) rolled back")
            else:
                self._finish(FINAL_ROLLED_BACK, f"rolled back on request: {rolled} device(s)")

    def _rolled_back(
        self,
        device: str,
        rb: _Rollback | None,
        ok: bool,
        code: str | None,
        message: str,
        *,
        needed: bool = True,
    ) -> None:
        self._add(
            RecordKind.DEVICE_ROLLED_BACK,
            {
                "to_version": rb.to_version if rb else None,
                "job": rb.job if rb else None,
                "ok": ok,
                "needed": needed,
                "code": code,
                "message": message,
            },
            device,
            "ok" if ok else (code or "failed"),
        )

    def _send_rollback(self, dev: DeviceState) -> None:
        s = self.state
        to_version = s.baselines.get(dev.device_id, {}).get("version")
        row = self.e.view.row(dev.device_id)
        serving = row.model_version if row is not None else None
        if dev.outcome == TIMED_OUT and serving is not None and serving != s.version:
            rb = _Rollback(None, None, time.monotonic(), serving)
            self._rolled_back(
                dev.device_id, rb, True, None, "never served the new version", needed=False
            )
            return
        if serving is not None and serving == to_version and serving != s.version:
            # Back already (a driver that died after sending its rollback, or the device's
            # own trial): a second rollback would be refused.
            rb = _Rollback(None, None, time.monotonic(), serving)
            self._rolled_back(dev.device_id, rb, True, None, f"already serves {serving}")
            return
        args = {"version": to_version} if isinstance(to_version, str) else {}
        future = self.e.commander.submit(
            dev.device_id, "rollback", args, timeout_s=self.e.command_timeout_s
        )
        self.rollbacks[dev.device_id] = _Rollback(future, None, time.monotonic(), to_version)

    def _poll_rollbacks(self) -> None:
        now = time.monotonic()
        use_row = self.use_rows
        for device, rb in list(self.rollbacks.items()):
            if rb.job is None:
                assert rb.future is not None
                if not rb.future.done():
                    continue
                try:
                    reply = rb.future.result()
                except FleetError as exc:
                    del self.rollbacks[device]
                    self._rolled_back(device, rb, False, exc.code.value, exc.message)
                    continue
                if not reply.ok:
                    del self.rollbacks[device]
                    err = reply.error
                    self._rolled_back(
                        device, rb, False, err.code if err else "failed", err.message if err else ""
                    )
                    continue
                result = reply.result if isinstance(reply.result, dict) else {}
                rb.job = str(result.get("job"))
                rb.since = now
            final = self._final_of(device, rb.job, use_row)
            if final is not None:
                del self.rollbacks[device]
                phase, code, reason = final
                ok = phase in (Phase.ROLLED_BACK.value, Phase.COMMITTED.value) and not code
                self._rolled_back(device, rb, ok, None if ok else (code or phase), reason or phase)
            elif now - rb.since > self.state.plan.device_timeout_s:
                del self.rollbacks[device]
                self._rolled_back(
                    device, rb, False, "update.device_timeout", "rollback job did not finish"
                )


class _NotServed(Exception):
    """The deploy source cannot serve one device (only that device fails; a source
    that cannot be built at all still stops the drive as before)."""

    def __init__(self, error: FleetError) -> None:
        super().__init__(error.message)
        self.error = error


def _field(message: Any, name: str) -> Any:
    if isinstance(message, dict):
        return message.get(name)
    return getattr(message, name, None)
