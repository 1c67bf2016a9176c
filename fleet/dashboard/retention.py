"""Telemetry into the store for the device charts, in batches, kept `retention_s`.

The view's listener (MQTT thread) appends one `TelemetrySample` per telemetry message
to a list; one writer thread hands the list to `store.add_telemetry` every
`flush_s` (one transaction per batch: 1,000 samples a second at 10,000 devices is one
insert of 1,000 rows, not 1,000 commits), and deletes what is older than the retention
every `prune_s`. A batch the store refuses is kept and retried on the next flush, up to
`max_pending` samples (then the oldest go: charts lose points, the server keeps running).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from fleet.errors import FleetError
from fleet.ports import View
from fleet.store import TelemetrySample

log = logging.getLogger(__name__)


class TelemetryStore(Protocol):
    def add_telemetry(self, samples: list[TelemetrySample]) -> int: ...

    def telemetry(
        self, *, device_id: str | None = None, since: float | None = None, limit: int | None = None
    ) -> list[TelemetrySample]: ...

    def prune(self, older_than: float) -> int: ...


class TelemetryRetention:
    def __init__(
        self,
        view: View,
        store: TelemetryStore,
        *,
        retention_s: float = 24 * 3600.0,
        flush_s: float = 1.0,
        prune_s: float = 60.0,
        max_pending: int = 200_000,
    ) -> None:
        self.view, self.store = view, store
        self.retention_s, self.flush_s, self.prune_s = retention_s, flush_s, prune_s
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: list[TelemetrySample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._remove: Callable[[], None] | None = None
        self.written = 0
        self.pruned = 0
        self.lost = 0
        self._next_prune = 0.0

    def start(self) -> TelemetryRetention:
        self._remove = self.view.add_listener(self._on_view)
        self._thread = threading.Thread(target=self._run, name="dashboard-telemetry", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()  # what came in last is kept too

    def _on_view(self, kind: str, device: str, message: Any) -> None:
        if kind != "telemetry":
            return
        row = self.view.row(device)  # the figures as the view read them
        if row is None:
            return
        ts = row.telemetry_ts or time.time()
        sample = TelemetrySample(device, ts, row.p95_ms, row.rate_per_s, row.error_rate,
                                 row.rss_mb, row.temperature_c)  # fmt: skip
        with self._lock:
            self._pending.append(sample)
            over = len(self._pending) - self.max_pending
            if over > 0:
                del self._pending[:over]
                self.lost += over

    def flush(self) -> int:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        try:
            n = self.store.add_telemetry(batch)
        except FleetError as exc:
            log.warning("telemetry not kept yet (%d samples, retried): %s", len(batch), exc)
            with self._lock:
                self._pending[:0] = batch
            return 0
        self.written += n
        return n

    def prune_now(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.retention_s
        try:
            n = self.store.prune(cutoff)
        except FleetError as exc:
            log.warning("telemetry not pruned: %s", exc)
            return 0
        self.pruned += n
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + self.prune_s
                self.prune_now()
