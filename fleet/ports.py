"""The console's seams: small typed interfaces between its parts.

    FleetClient (fleet/mqtt.py)   implements Commander: signed commands, replies, timeouts
    FleetView   (fleet/view.py)   implements View: one DeviceRow per device from the broker
    SqlStore    (fleet/store/)    implements Store: the append-only record and leases
    the rollout engine (fleet/rollout/) uses only these three Protocols, so it can be
    driven by the CLI, the dashboard or a test with the same code.

Values here are plain frozen dataclasses; wire bodies stay in `agent/protocol/`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from agent.protocol.messages import Reply

# --------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """What the console knows of one device: retained status + state, latest telemetry,
    the update job seen in events/state. `None` where nothing was seen yet."""

    device_id: str
    online: bool | None = None  # retained status; None: never seen a status
    since: float | None = None  # when that status began (the device's `since`)
    reason: str = ""  # status reason (e.g. "connection lost (last will)")
    agent_version: str | None = None
    groups: tuple[str, ...] = ()
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    variant: str | None = None  # the bundle variant the device chose (agent/variants/)
    variant_reason: str | None = None  # why: its figures, or "pinned by model.variant"
    previous_version: str | None = None  # the device's rollback slot (last-known-good)
    health: str = "unknown"  # "ready" | "overloaded" | "not_ready" | "unknown"
    p95_ms: float | None = None  # latest telemetry interval
    rate_per_s: float | None = None
    error_rate: float | None = None
    rss_mb: float | None = None
    temperature_c: float | None = None  # hottest zone
    outbox_messages: int | None = None
    telemetry_ts: float | None = None  # device clock of the latest telemetry
    seen_at: float | None = None  # console clock when anything last arrived
    job: str | None = None  # current/last update job id
    phase: str | None = None  # its phase (agent.protocol.update.Phase value)
    live: Mapping[str, Any] = field(default_factory=dict)  # telemetry model.live
    shadow: Mapping[str, Any] = field(default_factory=dict)  # telemetry model.shadow
    # The retained status's `topics` (agent.protocol.topics TOPICS_*): which command-topic
    # spellings the device takes; None: no status seen.
    topics: int | None = None


ViewKind = str  # "status" | "state" | "telemetry" | "event"
ViewListener = Callable[[ViewKind, str, Any], None]  # (kind, device_id, typed message)


class View(Protocol):
    """The live picture of the fleet, fed by the broker (retained status/state,
    telemetry, events). Thread-safe; listeners run on the MQTT thread and must be quick."""

    def rows(self, group: str | None = None) -> list[DeviceRow]: ...

    def row(self, device_id: str) -> DeviceRow | None: ...

    def add_listener(self, fn: ViewListener) -> Callable[[], None]:
        """Call `fn` for every message after it updated the rows; returns `remove`."""
        ...


# -------------------------------------------------------------------------- commands


class Commander(Protocol):
    """Sends signed commands (bound to their target, with an expiry) and owns every
    pending reply: each is resolved by its reply, or failed with FleetError
    (console.timeout) at its deadline, and forgotten on every path."""

    console_id: str
    key_id: str  # short id of the console's signing key (recorded as "who")

    def submit(
        self,
        target: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 10.0,
        lifetime_s: float = 60.0,
    ) -> Future[Reply]:
        """`target`: a device id. The future holds the device's Reply (ok or not) or
        raises FleetError(TIMEOUT) after `timeout_s`."""
        ...

    def request(
        self,
        target: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 10.0,
        lifetime_s: float = 60.0,
    ) -> Reply: ...


# --------------------------------------------------------------------------- records


class RecordKind(StrEnum):
    """Kinds of the append-only record. A rollout's state is the fold of its records."""

    COMMAND_SENT = "command.sent"  # data: target, name, args digest, command id
    COMMAND_REPLY = "command.reply"  # data: command id, ok, code/result summary
    ROLLOUT_CREATED = "rollout.created"  # data: plan, bundle (name, version, sha256, size)
    ROLLOUT_BASELINE = "rollout.baseline"  # device_id, the figures gates compare against
    WAVE_STARTED = "wave.started"  # data: wave index, devices
    DEVICE_STARTED = "device.started"  # device_id, job id
    DEVICE_OUTCOME = "device.outcome"  # device_id, outcome (succeeded/failed/timed_out/...)
    GATE_RESULT = "gate.result"  # device_id, gate, figure, baseline, limit, passed
    WAVE_FINISHED = "wave.finished"  # wave index, succeeded, failed, passed
    PAUSE_REQUESTED = "rollout.pause_requested"  # by any console; the driver obeys
    RESUME_REQUESTED = "rollout.resume_requested"
    ABORT_REQUESTED = "rollout.abort_requested"
    ROLLBACK_REQUESTED = "rollout.rollback_requested"
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_RESUMED = "rollout.resumed"
    ROLLOUT_HALTED = "rollout.halted"  # a gate or threshold failed: reason + figures
    DEVICE_ROLLED_BACK = "device.rolled_back"  # device_id, to version
    ROLLOUT_FINISHED = "rollout.finished"  # final: succeeded | halted | aborted | rolled_back
    DRIVER_TOOK_OVER = "rollout.driver"  # which console (lease holder) drives it now


@dataclass(frozen=True, slots=True)
class NewRecord:
    kind: RecordKind
    data: Mapping[str, Any] = field(default_factory=dict)
    rollout_id: str | None = None
    device_id: str | None = None
    result: str | None = None  # "ok", an error code, an outcome


@dataclass(frozen=True, slots=True)
class Record:
    seq: int  # store-wide, strictly increasing
    ts: float  # Unix seconds, the store's clock
    key_id: str  # who: the console key id
    operator: str  # who: the operator's name (fleet.toml / $USER)
    kind: RecordKind
    data: Mapping[str, Any]
    rollout_id: str | None
    device_id: str | None
    result: str | None


@dataclass(frozen=True, slots=True)
class Lease:
    """Who drives a rollout. `token` grows with every new holder (a fencing token):
    the store refuses appends under a lease that is no longer the current one."""

    name: str
    holder: str
    token: int
    expires_at: float


class Store(Protocol):
    """The append-only record (SQLite file or PostgreSQL URL) and driver leases."""

    def append(
        self, entries: Sequence[NewRecord], *, who: tuple[str, str], lease: Lease | None = None
    ) -> list[Record]:
        """Append in one transaction; `who` = (key_id, operator). With `lease`, refused
        (FleetError console.lease_held) unless that lease is still the current one."""
        ...

    def records(
        self,
        *,
        rollout_id: str | None = None,
        device_id: str | None = None,
        kinds: Iterable[RecordKind] | None = None,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[Record]: ...

    def rollout_ids(self, limit: int = 100) -> list[str]:
        """Rollouts, newest first."""
        ...

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease if free or expired (or already ours); None if another holds it."""
        ...

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        """Raises FleetError(console.lease_held) when it was lost to another holder."""
        ...

    def release_lease(self, lease: Lease) -> None: ...

    def lease(self, name: str) -> Lease | None: ...

    def close(self) -> None: ...
