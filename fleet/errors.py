"""One error root for the console, with stable codes (as the device's `agent.errors`).

Every failure an operator can meet leaves `edge-fleet` as a `FleetError`: the CLI prints
`edge-fleet: [code] message` (or `{"error": {"code", "message"}}` with `--json`) and exits
2; no traceback reaches the operator.
"""

from __future__ import annotations

from enum import StrEnum


class FleetCode(StrEnum):
    CONFIG = "console.config"  # fleet.toml / global options wrong (key named)
    BROKER = "console.broker_unreachable"  # cannot connect, TLS or auth refused
    TIMEOUT = "console.timeout"  # no reply before the deadline (device offline or slow)
    OFFLINE = "console.device_offline"  # retained status says offline: not waited for
    UNKNOWN_DEVICE = "console.unknown_device"  # never seen on the broker
    REFUSED = "console.refused"  # the device answered ok=false (its code in `device_code`)
    BAD_INPUT = "console.bad_input"  # a file, plan, gate or argument the operator gave
    STORE = "console.store"  # the record (SQLite/PostgreSQL) failed or is too new
    LEASE = "console.lease_held"  # another console drives this rollout
    NOT_FOUND = "console.not_found"  # no such rollout / record
    BUNDLE = "console.bundle"  # the bundle to deploy does not verify
    INTERNAL = "console.internal"  # a bug in edge-fleet: one line, never a traceback


class FleetError(Exception):
    """Root of every console error; `code` is stable, `message` says what to do."""

    def __init__(self, code: FleetCode, message: str, **details: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"[{self.code.value}] {self.message}"

    def to_json(self) -> dict[str, object]:
        return {"code": self.code.value, "message": self.message, **self.details}
