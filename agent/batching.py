"""Dynamic micro-batching: concurrent requests share one runtime call.

Off by default. When on, a request waits at most `max_wait_ms` for others with the
same per-row shapes, up to `max_batch` rows, then the batch runs once and each
caller gets its own rows back.

A batcher belongs to one served generation (agent.serving) and is closed by that
generation's last user. Closing never strands a caller: `submit` after `close`
raises `BatcherClosedError` at once, and anything still queued when the loop stops
gets the same error, so the caller runs its request directly on the same model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from agent.runtimes.base import Feeds

log = logging.getLogger(__name__)

RunFn = Callable[[Feeds], Feeds]


class BatcherClosedError(Exception):
    """The batcher stopped before it ran this request; run it directly instead."""


class _Item:
    __slots__ = ("feeds", "future", "key", "rows")

    def __init__(self, feeds: Feeds, rows: int) -> None:
        self.feeds = feeds
        self.rows = rows
        self.future: Future[Feeds] = Future()
        self.key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items()))


class MicroBatcher:
    def __init__(
        self,
        run: RunFn,
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self._on_batch = on_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._held: _Item | None = None
        # Guards `_closed` against a submit racing close: an item is queued only
        # before the stop marker, so the loop sees every item or none is queued.
        self._gate = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, feeds: Feeds, rows: int) -> Feeds:
        item = _Item(feeds, rows)
        with self._gate:
            if self._closed:
                raise BatcherClosedError("the micro-batcher is closed")
            self._queue.put(item)
        return item.future.result()

    def close(self) -> None:
        """Run what is already queued, then stop; later submits raise at once."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> _Item | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return (
            self._queue.get(timeout=timeout)
            if timeout is None or timeout > 0
            else (self._queue.get_nowait())
        )

    def _loop(self) -> None:
        try:
            self._batches()
        except BaseException:  # a bug here must not strand callers on their futures
            log.exception("micro-batcher loop failed")
        finally:
            self._fail_leftovers()

    def _batches(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = [first]
            rows = first.rows
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while rows < self.max_batch:
                try:
                    item = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if item.key != first.key or rows + item.rows > self.max_batch:
                    self._held = item  # starts the next batch
                    break
                batch.append(item)
                rows += item.rows
            self._execute(batch)
            if stop:
                self._queue.put(None)  # seen again once the held item has run

    def _fail_leftovers(self) -> None:
        with self._gate:
            self._closed = True
        leftovers = [self._held] if self._held is not None else []
        self._held = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftovers.append(item)
        for item in leftovers:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the micro-batcher stopped"))

    def _execute(self, batch: list[_Item]) -> None:
        rows = sum(item.rows for item in batch)
        try:
            if self._on_batch is not None:
                self._on_batch(rows)
            if len(batch) == 1:
                batch[0].future.set_result(self._run(batch[0].feeds))
                return
            names = list(batch[0].feeds)
            merged = {n: np.concatenate([b.feeds[n] for b in batch]) for n in names}
            out = self._run(merged)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        start = 0
        for item in batch:
            item.future.set_result({k: v[start : start + item.rows] for k, v in out.items()})
            start += item.rows
