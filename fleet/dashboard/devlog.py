"""What a device page shows that the view does not keep: the device's recent events,
the models it was seen serving and its telemetry interval (for when its row turns
stale), while this server runs (bounded per device and over the fleet). The
record adds the model changes rollouts made (fleet/dashboard/api.py merges them)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fleet.dashboard.rows import stale_after
from fleet.ports import View

EVENTS_KEPT = 100  # per device
EVENTS_TOTAL = 100_000  # over the fleet: 10,000 devices x 100 events would be ~0.5 GB
MODELS_KEPT = 50


class DeviceLog:
    def __init__(
        self, view: View, *, events_kept: int = EVENTS_KEPT, events_total: int = EVENTS_TOTAL
    ) -> None:
        self.events_kept, self.events_total = events_kept, events_total
        self._lock = threading.Lock()
        # Each device's events as (n, event); `_order` is every (n, device) in arrival
        # order, so the fleet-wide oldest goes first when the total is over its bound.
        self._events: dict[str, deque[tuple[int, dict[str, Any]]]] = {}
        self._order: deque[tuple[int, str]] = deque()
        self._n = 0
        self._live = 0  # events kept (the `_order` entries not stale)
        self._intervals: dict[str, float] = {}  # device -> its telemetry interval
        self._models: dict[str, deque[dict[str, Any]]] = {}
        self._remove: Callable[[], None] | None = view.add_listener(self._on_view)

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def _on_view(self, kind: str, device: str, message: Any) -> None:
        if kind == "telemetry":
            interval = getattr(message, "interval_s", None)
            if isinstance(interval, int | float) and interval > 0:
                self._intervals[device] = float(interval)  # one writer: the MQTT thread
            return
        if kind == "event":
            item = {
                "ts": getattr(message, "ts", None),
                "kind": getattr(message, "kind", ""),
                "reason": getattr(message, "reason", ""),
                "data": getattr(message, "data", {}) or {},
            }
            with self._lock:
                self._n += 1
                q = self._events.get(device)
                if q is None:
                    q = self._events[device] = deque()
                q.append((self._n, item))
                self._order.append((self._n, device))
                self._live += 1
                if len(q) > self.events_kept:
                    q.popleft()  # its `_order` entry goes stale: skipped when reached
                    self._live -= 1
                while self._live > self.events_total:
                    n, oldest = self._order.popleft()
                    dq = self._events.get(oldest)
                    if dq and dq[0][0] == n:
                        dq.popleft()
                        self._live -= 1
                        if not dq:
                            del self._events[oldest]
                if len(self._order) > 2 * self.events_total + 1000:
                    # Stale entries of chatty devices: rebuild the order from what is kept.
                    self._order = deque(
                        sorted((n, d) for d, dq in self._events.items() for n, _ in dq)
                    )
        elif kind == "state":
            model = getattr(message, "model", None)
            version = getattr(model, "version", None) if model is not None else None
            if not version:
                return
            sha = getattr(model, "sha256", None) or None
            with self._lock:
                models = self._models.get(device)
                if models is None:
                    models = self._models[device] = deque(maxlen=MODELS_KEPT)
                if models and models[-1]["version"] == version and models[-1]["sha256"] == sha:
                    return
                models.append({"ts": time.time(), "version": version, "sha256": sha, "via": None})

    def stale_s(self, device: str) -> float:
        """How long a device may be silent before its row warns."""
        return stale_after(self._intervals.get(device))

    def events(self, device: str) -> list[dict[str, Any]]:
        with self._lock:
            return [item for _, item in self._events.get(device, ())]

    def models(self, device: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m) for m in self._models.get(device, ())]
