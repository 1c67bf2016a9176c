"""Dynamic micro-batching: concurrent requests share one runtime call.

Off by default. When on, a request waits at most `max_wait_ms` for others with the
same per-row shapes, up to `max_batch` rows, then the batch runs once and each
caller gets its own rows back.
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
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, feeds: Feeds, rows: int) -> Feeds:
        item = _Item(feeds, rows)
        self._queue.put(item)
        return item.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

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
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = [first]
            rows = first.rows
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch:
                try:
                    item = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                if item.key != first.key or rows + item.rows > self.max_batch:
                    self._held = item  # starts the next batch
                    break
                batch.append(item)
                rows += item.rows
            self._execute(batch)

    def _execute(self, batch: list[_Item]) -> None:
        if self._on_batch is not None:
            self._on_batch(sum(item.rows for item in batch))
        if len(batch) == 1:
            item = batch[0]
            try:
                item.future.set_result(self._run(item.feeds))
            except Exception as exc:
                item.future.set_exception(exc)
            return
        names = list(batch[0].feeds)
        merged = {n: np.concatenate([b.feeds[n] for b in batch]) for n in names}
        try:
            out = self._run(merged)
        except Exception as exc:
            for item in batch:
                item.future.set_exception(exc)
            return
        start = 0
        for item in batch:
            item.future.set_result({k: v[start : start + item.rows] for k, v in out.items()})
            start += item.rows
