"""The rollout driver: waves of deploys, soaks, gates, thresholds, halts and rollbacks.
`RolloutEngine.create` records a rollout; `.drive` takes its lease and runs the tick
loop (fleet/rollout/drive.py) to the end.

It uses only the console's seams (fleet/ports.py): a Commander to send signed commands,
a View for the devices' state, telemetry and events, and a Store for the record and
the lease. All that matters lives in the record: each tick the driver reads the
records appended since the last one (its own and other consoles' pause/resume/abort/
rollback requests), folds them (fleet/rollout/state.py), decides, and appends what it
decided in one transaction under the lease `rollout:<id>`. Its memory holds only what
is in flight (command futures, soak deadlines); a driver that dies leaves its lease to
lapse, and the next one rebuilds the rest from the record and asks the devices that
were mid-update for their job (`update.status`).

Decisions (said in docs/fleet.md "Rollouts"):
- a device offline when its turn comes is `skipped_offline`: never sent anything, left
  on its version, counted in neither threshold (it was not tried) but listed; one that
  served the bundle before the rollout is `already_current`, likewise left alone;
- a device whose deploy is not answered in time, or that shows no final phase within
  `device_timeout_s`, is `timed_out`: a failure, and rolled back on a halt when it
  serves the new version by then;
- any failed gate halts; a wave below its success threshold halts; the abort
  threshold is checked after every outcome, once `abort_min_finished` finished;
- a halt rolls back every device this rollout updated, each to the version it served
  before (its baseline); devices not yet reached are never touched.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable

from fleet.errors import FleetCode, FleetError
from fleet.ports import Commander, NewRecord, Record, RecordKind, Store, View
from fleet.rollout.bundle import BundleInfo
from fleet.rollout.drive import Drive
from fleet.rollout.gates import figures_of
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.sources import SourceFactory
from fleet.rollout.state import RolloutState

RecordHook = Callable[[Record, RolloutState], None]
NoteHook = Callable[[str], None]


def new_rollout_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"r-{stamp}-{uuid.uuid4().hex[:6]}"


def lease_name(rollout_id: str) -> str:
    return f"rollout:{rollout_id}"


def resolve_targets(view: View, targets: Iterable[str]) -> list[str]:
    """The device ids a plan's targets name, from what the view saw on the broker."""
    out: set[str] = set()
    for target in targets:
        if target == "all":
            out.update(r.device_id for r in view.rows())
        elif target.startswith("group:"):
            group = target[len("group:") :]
            members = [r.device_id for r in view.rows(group)]
            if not members:
                raise FleetError(
                    FleetCode.BAD_INPUT,
                    f"--to {target}: no device of group {group!r} was seen on the broker",
                )
            out.update(members)
        else:
            if view.row(target) is None:
                raise FleetError(
                    FleetCode.UNKNOWN_DEVICE,
                    f"--to {target}: no such device was seen on the broker "
                    "(`edge-fleet devices` lists those seen)",
                )
            out.add(target)
    if not out:
        raise FleetError(FleetCode.BAD_INPUT, "no device to update: the broker shows none")
    return sorted(out)


def driven_elsewhere(store: Store, rollout_id: str) -> FleetError:
    held = store.lease(lease_name(rollout_id))
    who = held.holder if held else "another console"
    left = max(0.0, held.expires_at - time.time()) if held else 0.0
    return FleetError(
        FleetCode.LEASE,
        f"rollout {rollout_id} is driven by {who} (its lease runs {left:.0f} s more); "
        "a console that died lets it lapse: then `edge-fleet rollout resume "
        f"{rollout_id}` takes over",
        holder=who,
    )


def lease_is_live(store: Store, rollout_id: str) -> bool:
    held = store.lease(lease_name(rollout_id))
    return held is not None and held.expires_at > time.time()


class RolloutEngine:
    """Creates rollouts and drives them; one engine may drive several, one at a time."""

    def __init__(
        self,
        store: Store,
        view: View,
        commander: Commander,
        *,
        operator: str,
        sources: SourceFactory,
        holder: str | None = None,
        tick_s: float = 0.2,
        lease_ttl_s: float = 15.0,
        command_timeout_s: float = 10.0,
        baseline_wait_s: float = 30.0,
        gate_wait_s: float = 30.0,
        on_record: RecordHook | None = None,
        on_note: NoteHook | None = None,
    ) -> None:
        self.store, self.view, self.commander = store, view, commander
        self.who = (commander.key_id, operator)
        self.holder = holder or f"{commander.console_id}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self.sources = sources
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        self.command_timeout_s = command_timeout_s
        self.baseline_wait_s = baseline_wait_s
        self.gate_wait_s = gate_wait_s
        self.on_record = on_record
        self.on_note = on_note

    def create(
        self, plan: RolloutPlan, bundle: BundleInfo, rollout_id: str | None = None
    ) -> RolloutState:
        """Resolve the targets, record the rollout and every device's baseline."""
        devices = resolve_targets(self.view, plan.targets)
        if plan.gates:
            self._await_telemetry(devices)
        rid = rollout_id or new_rollout_id()
        waves = plan.waves(devices)
        entries = [
            NewRecord(
                RecordKind.ROLLOUT_CREATED,
                {
                    "plan": plan.to_json(),
                    "bundle": bundle.to_json(),
                    "targets": devices,
                    "waves": waves,
                },
                rollout_id=rid,
                result="created",
            )
        ]
        for dev in devices:
            row = self.view.row(dev)
            figures = figures_of(row) if row is not None else {}
            entries.append(
                NewRecord(
                    RecordKind.ROLLOUT_BASELINE, {"figures": figures}, rollout_id=rid, device_id=dev
                )
            )
        self.store.append(entries, who=self.who)
        return RolloutState.fold(self.store.records(rollout_id=rid))

    def _await_telemetry(self, devices: list[str]) -> None:
        """A console that just connected has the retained state but no telemetry yet:
        wait (bounded) for each online device's first report, so that every baseline
        holds the device's figures. One that sends none by then has an empty baseline,
        and a relative gate on it is inconclusive (said in its result)."""
        deadline = time.monotonic() + self.baseline_wait_s

        def missing() -> list[str]:
            out = []
            for dev in devices:
                row = self.view.row(dev)
                if row is not None and row.online and row.telemetry_ts is None:
                    out.append(dev)
            return out

        waiting = missing()
        while waiting and time.monotonic() < deadline:
            time.sleep(0.05)
            waiting = missing()
        if waiting and self.on_note is not None:
            self.on_note(
                f"{len(waiting)} device(s) sent no telemetry within {self.baseline_wait_s:g} s "
                f"(e.g. {waiting[0]}): their baselines are empty"
            )

    def drive(self, rollout_id: str, bundle_path: str | None = None) -> RolloutState:
        """Take the lease and drive the rollout to its end; returns the final state."""
        name = lease_name(rollout_id)
        if not self.store.records(rollout_id=rollout_id, limit=1):
            raise FleetError(FleetCode.NOT_FOUND, f"no rollout {rollout_id!r} in the record")
        lease = self.store.acquire_lease(name, self.holder, self.lease_ttl_s)
        if lease is None:
            raise driven_elsewhere(self.store, rollout_id)
        drive = Drive(self, rollout_id, lease, bundle_path)
        try:
            return drive.run()
        finally:
            drive.close()
