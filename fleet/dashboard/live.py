"""The server-sent events hub behind `GET /api/live`.

    event: devices   data: {"rows": [changed rows], "total": N}   at most every 250 ms
    event: rollout   data: {"id", "summary"}                      a rollout got records
    event: ping      data: {}                                     every 15 s, and at connect

`GET /api/live?devices=a,b` carries only those devices' rows (a device page, the rows
a table page shows: at 10,000 devices the whole stream is ~250 rows every 250 ms);
`?devices=` (empty) none, for a page that wants only rollout events.

The view's listener (MQTT thread) only adds the device id to a set and, when the set
was empty, wakes the hub: one cross-thread call per flush, not per message. The hub
(one asyncio task) builds each event once, encodes it once and puts the same bytes in
every client's bounded queue; a client whose queue is full is dropped (its stream ends,
EventSource reconnects by itself), so a slow reader never holds up the hub or the others.
The store is tailed with `after_seq` off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sized
from typing import Any

from fleet.dashboard.rows import STALE_S, row_json
from fleet.errors import FleetError
from fleet.ports import Record, Store, View
from fleet.rollout.control import load
from fleet.rollout.state import RolloutState

log = logging.getLogger(__name__)

ROLLOUTS_KEPT = 20  # folded rollout states kept for incremental updates


def encode(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Client:
    def __init__(self, queue_size: int, devices: frozenset[str] | None = None) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(queue_size)
        self.dropped = False
        # None: every changed row; a set: only those devices' rows (a device page, the
        # rows a table shows); empty: no device rows (a rollout page).
        self.devices = devices


class LiveHub:
    def __init__(
        self,
        view: View,
        store: Store | None,
        *,
        interval_s: float = 0.25,
        ping_s: float = 15.0,
        queue_size: int = 64,
        rollout_poll_s: float = 0.5,
        stale_of: Callable[[str], float] = lambda device: STALE_S,
    ) -> None:
        self.view, self.store = view, store
        self.stale_of = stale_of
        self.interval_s, self.ping_s = interval_s, ping_s
        self.queue_size, self.rollout_poll_s = queue_size, rollout_poll_s
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._clients: set[Client] = set()
        self._task: asyncio.Task[None] | None = None
        self._remove: Callable[[], None] | None = None
        self._last_seq = 0
        self._states: dict[str, RolloutState] = {}  # rollout id -> its folded state
        self.dropped = 0  # clients dropped for being slow
        self.sent_events = 0
        self.last_flush = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self.store is not None:
            self._last_seq = await asyncio.to_thread(_latest_seq, self.store)
        self._remove = self.view.add_listener(self._on_view)
        self._task = asyncio.create_task(self._run(), name="dashboard-live")

    async def stop(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for client in list(self._clients):
            self._close(client)

    @property
    def clients(self) -> int:
        return len(self._clients)

    # ------------------------------------------------------------------ feeding

    def _on_view(self, kind: str, device: str, message: Any) -> None:
        # MQTT thread: keep it to a set insert; wake the loop only on empty -> not empty.
        with self._lock:
            first = not self._dirty
            self._dirty.add(device)
        if first and self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        next_poll = time.monotonic()
        while True:
            timeout = None if self.store is None else max(0.0, next_poll - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                wait = self.last_flush + self.interval_s - time.monotonic()
                if wait > 0:  # coalesce: at most one devices event per interval
                    await asyncio.sleep(wait)
                self._flush_devices()
                if self.store is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.rollout_poll_s
                    await self._tail_rollouts()
            except asyncio.CancelledError:
                raise
            except Exception:  # the hub must outlive one bad tick
                log.exception("live hub tick failed")
                await asyncio.sleep(self.interval_s)

    def _flush_devices(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        self.last_flush = time.monotonic()
        now = time.time()
        rows = []
        for device in sorted(dirty):
            row = self.view.row(device)
            if row is not None:
                rows.append(row_json(row, now, self.stale_of(device)))
        if not rows or not self._clients:
            return
        sized = self.view
        total = len(sized) if isinstance(sized, Sized) else len(self.view.rows())
        everyone: bytes | None = None
        for client in list(self._clients):
            if client.devices is None:
                if everyone is None:  # encoded once for all unfiltered clients
                    everyone = encode("devices", {"rows": rows, "total": total})
                self._put(client, everyone)
                continue
            mine = [r for r in rows if r["device_id"] in client.devices]
            if mine:
                self._put(client, encode("devices", {"rows": mine, "total": total}))
        self.sent_events += 1

    async def _tail_rollouts(self) -> None:
        store = self.store
        assert store is not None
        try:
            records = await asyncio.to_thread(store.records, after_seq=self._last_seq, limit=5000)
        except FleetError as exc:
            log.warning("live: cannot read the record: %s", exc)
            return
        if not records:
            return
        self._last_seq = records[-1].seq
        by_rollout: dict[str, list[Record]] = {}
        for r in records:
            if r.rollout_id:
                by_rollout.setdefault(r.rollout_id, []).append(r)
        for rid, new in by_rollout.items():
            state = self._states.pop(rid, None)
            if state is None:
                # Folded once from the whole record; from then on only the new records
                # are applied (a 10,000-device rollout has tens of thousands).
                try:
                    state = await asyncio.to_thread(load, store, rid)
                except FleetError as exc:
                    log.warning("live: rollout %s unreadable: %s", rid, exc)
                    continue
            else:
                for r in new:
                    state.apply(r)  # records already folded (seq <= last_seq) are skipped
            self._states[rid] = state  # most recent last
            while len(self._states) > ROLLOUTS_KEPT:
                del self._states[next(iter(self._states))]
            if self._clients:
                self.broadcast(encode("rollout", {"id": rid, "summary": state.summary()}))

    # ------------------------------------------------------------------ clients

    def broadcast(self, payload: bytes) -> None:
        self.sent_events += 1
        for client in list(self._clients):
            self._put(client, payload)

    def _put(self, client: Client, payload: bytes) -> None:
        try:
            client.queue.put_nowait(payload)
        except asyncio.QueueFull:
            log.info("live: a client fell %d events behind; dropped", self.queue_size)
            self.dropped += 1
            self._close(client)

    def _close(self, client: Client) -> None:
        self._clients.discard(client)
        client.dropped = True
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(None)  # the stream ends at this marker

    async def stream(self, devices: frozenset[str] | None = None) -> AsyncIterator[bytes]:
        """One client's event stream (for a StreamingResponse); `devices`: see Client."""
        client = Client(self.queue_size, devices)
        self._clients.add(client)
        try:
            # EventSource reconnects after `retry` ms when the stream ends.
            yield b"retry: 2000\n" + encode("ping", {})
            while True:
                try:
                    item = await asyncio.wait_for(client.queue.get(), self.ping_s)
                except TimeoutError:
                    item = encode("ping", {})
                if item is None:
                    return
                yield item
        finally:
            self._clients.discard(client)


def _latest_seq(store: Store) -> int:
    """Where to start tailing: the newest record (nothing older is news)."""
    try:
        newest = store.records(limit=1, newest_first=True)  # type: ignore[call-arg]
    except TypeError:  # a Store without newest_first: read through it once
        every = store.records()
        return every[-1].seq if every else 0
    except FleetError as exc:
        log.warning("live: cannot read the record: %s", exc)
        return 0
    return newest[0].seq if newest else 0
