"""Device rows as the dashboard serves them: `DeviceRow` fields plus `age_s` and
`health_class`, and the table query (group, search, sort, page) done server-side so
10,000 devices cost one page of JSON per request."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fleet.ports import DeviceRow

HEALTH_CLASSES = ("ok", "warn", "bad", "offline", "unknown")

# Error rates the colours switch at: 1% is a warning, 5% is bad (per telemetry interval).
WARN_ERROR_RATE = 0.01
BAD_ERROR_RATE = 0.05
# An online device with no news for three of its telemetry intervals (at least 30 s;
# the agent reports every 10 s by default) is shown as a warning.
STALE_S = 30.0
STALE_INTERVALS = 3
_FAILED_PHASES = {"failed", "rolled_back"}

ROW_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceRow))
# What `sort` accepts: the scalar fields (sorting by a list or a mapping means nothing)
# plus the two the dashboard adds.
SORT_FIELDS = tuple(
    sorted({*(n for n in ROW_FIELDS if n not in ("groups", "live", "shadow")), "age_s",
            "health_class"})
)  # fmt: skip
MAX_LIMIT = 1000


def stale_after(interval_s: float | None) -> float:
    return max(STALE_S, STALE_INTERVALS * interval_s) if interval_s else STALE_S


def health_class(row: DeviceRow, now: float, stale_s: float = STALE_S) -> str:
    """offline | bad | warn | ok | unknown, the colour of a row."""
    if row.online is False:
        return "offline"
    if row.online is None:
        return "unknown"
    err = row.error_rate
    if row.health == "not_ready" or (err is not None and err >= BAD_ERROR_RATE):
        return "bad"
    stale = row.seen_at is not None and now - row.seen_at > stale_s
    if (
        row.health == "overloaded"
        or (err is not None and err >= WARN_ERROR_RATE)
        or row.phase in _FAILED_PHASES
        or stale
    ):
        return "warn"
    return "ok" if row.health == "ready" else "unknown"


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; a figure that is not finite is shown as missing.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def row_json(row: DeviceRow, now: float | None = None, stale_s: float = STALE_S) -> dict[str, Any]:
    now = time.time() if now is None else now
    out = {name: _clean(getattr(row, name)) for name in ROW_FIELDS}
    out["age_s"] = None if row.seen_at is None else round(max(0.0, now - row.seen_at), 3)
    out["health_class"] = health_class(row, now, stale_s)
    return out


def groups_of(rows: Sequence[DeviceRow]) -> list[str]:
    return sorted({g for r in rows for g in r.groups})


def _sort_value(row: DeviceRow, field: str, now: float, stale_of: Callable[[str], float]) -> Any:
    if field == "age_s":
        return None if row.seen_at is None else now - row.seen_at
    if field == "health_class":
        return HEALTH_CLASSES.index(health_class(row, now, stale_of(row.device_id)))
    return getattr(row, field)


def query(
    rows: Sequence[DeviceRow],
    *,
    q: str = "",
    sort: str = "device_id",
    desc: bool = False,
    now: float,
    stale_of: Callable[[str], float] = lambda device: STALE_S,
) -> list[DeviceRow]:
    """Filter by `q` (a substring of the id, model name or version, case-insensitive)
    and sort; rows without the figure go last whatever the direction, the id breaks ties."""
    if q:
        needle = q.lower()
        rows = [
            r
            for r in rows
            if needle in r.device_id.lower()
            or needle in (r.model_name or "").lower()
            or needle in (r.model_version or "").lower()
        ]
    if sort == "device_id":
        return sorted(rows, key=lambda r: r.device_id, reverse=desc)
    have: list[tuple[Any, DeviceRow]] = []
    missing: list[DeviceRow] = []
    for r in rows:
        v = _sort_value(r, sort, now, stale_of)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            missing.append(r)
        else:
            have.append((v, r))
    have.sort(key=lambda p: p[1].device_id)  # stable: ties in id order
    have.sort(key=lambda p: p[0], reverse=desc)
    missing.sort(key=lambda r: r.device_id)
    return [r for _, r in have] + missing
