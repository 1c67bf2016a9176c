"""RecordBatcher: many small records (a command sent, its reply) in few transactions.

One record per transaction costs a commit each (an fsync on SQLite, round trips on
PostgreSQL: bench/store.py); a rollout over 10,000 devices sends and hears back 20,000
commands. The batcher takes records from any thread without touching the database
(`add` never blocks on it: MQTT callbacks call it) and one writer thread appends them
in order, up to `max_batch` a transaction, at most `max_delay_s` after they arrived.

Nothing is dropped: when an append fails (database down, file locked) the records stay
queued, in order, and are retried with a growing pause; `flush()` waits until all that
was added before it is written, and raises the last FleetError if that did not happen
in time. Records that must be durable before the console acts on them (a rollout's
state changes under its lease) go through `Store.append` directly, not through here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from fleet.errors import FleetCode, FleetError
from fleet.ports import NewRecord, Store

log = logging.getLogger(__name__)


class RecordBatcher:
    def __init__(
        self,
        store: Store,
        who: tuple[str, str],
        *,
        max_batch: int = 500,
        max_delay_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        self._store = store
        self._who = who
        self._max_batch = max(1, max_batch)
        self._max_delay_s = max_delay_s
        self._retry_max_s = retry_max_s
        self._cond = threading.Condition()
        self._queue: deque[NewRecord] = deque()  # guarded by _cond
        self._added = 0  # records ever added (guarded by _cond)
        self._written = 0  # records ever written
        self._closing = False
        self._urgent = False  # a flush waits: write what is queued now
        self.error: FleetError | None = None  # the last failure, None once writes succeed
        self._thread = threading.Thread(target=self._run, name="record-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def add(self, entry: NewRecord) -> None:
        with self._cond:
            if self._closing:
                raise FleetError(FleetCode.STORE, "the record batcher is closed")
            self._queue.append(entry)
            self._added += 1
            self._cond.notify_all()

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every record added before this call is written."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._added
            self._urgent = True  # no need to wait out max_delay_s
            self._cond.notify_all()
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    error = self.error
                    raise FleetError(
                        FleetCode.STORE,
                        f"{target - self._written} records are not written yet"
                        + (f": {error.message}" if error else "")
                        + "; they stay queued and are retried",
                    )
                self._cond.wait(min(left, 0.1))

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush, then stop the writer. Raises (FleetError) if records could not be
        written in time; they are then lost with this process, and the log says so."""
        try:
            self.flush(timeout_s)
        finally:
            with self._cond:
                self._closing = True
                left = len(self._queue)
                self._cond.notify_all()
            self._thread.join(timeout=max(1.0, self._retry_max_s + 1))
            if left:
                log.error("record batcher closed with %d records unwritten", left)

    def _wait_until(self, until: float, ready: Callable[[], bool]) -> None:
        # Under _cond. add() notifies on every record, so wait for the condition itself.
        while not ready() and not self._closing:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _run(self) -> None:
        pause = 0.05
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing and (not self._queue or self.error is not None):
                    return
                # Let a burst gather (bounded), unless a batch is full or someone flushes.
                self._wait_until(
                    time.monotonic() + self._max_delay_s,
                    lambda: len(self._queue) >= self._max_batch or self._urgent,
                )
                self._urgent = False
                batch = [self._queue[i] for i in range(min(self._max_batch, len(self._queue)))]
            try:
                self._store.append(batch, who=self._who)
            except Exception as exc:
                if not isinstance(exc, FleetError):  # a store bug: say so, keep going
                    log.exception("record append failed unexpectedly")
                    exc = FleetError(FleetCode.STORE, f"record append failed: {exc!r}")
                if self.error is None:
                    log.warning("record append failed, will retry: %s", exc)
                self.error = exc
                with self._cond:
                    self._wait_until(time.monotonic() + pause, lambda: False)
                pause = min(pause * 2, self._retry_max_s)
                continue
            if self.error is not None:
                log.info("record appends work again")
            self.error = None
            pause = 0.05
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._written += len(batch)
                self._cond.notify_all()
