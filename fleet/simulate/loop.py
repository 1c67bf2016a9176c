"""One thread that drives many paho clients and timers: the simulator's event loop.

paho's external-loop API (`on_socket_open` / `on_socket_close` /
`on_socket_register_write` / `on_socket_unregister_write` with `loop_read`,
`loop_write`, `loop_misc`) lets one `selectors` loop run hundreds or thousands of
MQTT connections: `loop_start()` would spend one thread per connection, which at
1,000 simulated devices on 2 cores costs more in wake-ups than the devices do.

Everything the simulated devices do runs on this thread (timers and MQTT
callbacks), so device state needs no locks. Other threads hand work over with
`call_soon` (thread safe; wakes the loop through a socket pair).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

MISC_EVERY_S = 0.5  # keepalive pings and paho's timeouts
MAX_SSL_READS = 64  # packets read at once while TLS holds decrypted bytes
# Timers run per turn at most: a wave of 2,500 jobs moving to their next phase at once
# must not keep the loop from reading the commands (and answering them) for seconds.
TIMERS_PER_TURN = 256


class Timer:
    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, name: str = "sim-loop") -> None:
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._dirty: set[paho.Client] = set()
        self._clients: set[paho.Client] = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.busy_s = 0.0  # time spent working (not waiting in select): the loop's CPU

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Reactor:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        with contextlib.suppress(OSError):
            self._wake_r.close()
            self._wake_w.close()
        self._sel.close()

    @property
    def on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    # ----------------------------------------------------------------- work

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread (from any thread)."""
        self._calls.append(fn)
        if not self.on_loop:
            self._wake()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> Timer:
        """Loop thread only (use call_soon to get there first)."""
        timer = Timer(time.monotonic() + max(0.0, delay_s), fn)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"x")

    # ----------------------------------------------------------------- paho clients

    def attach(self, client: paho.Client) -> None:
        """Drive `client` from this loop; call before its first connect."""
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._clients.add(client)

    def detach(self, client: paho.Client) -> None:
        self._clients.discard(client)
        self._dirty.discard(client)

    def _on_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        self._sel.register(sock, selectors.EVENT_READ, client)
        self._dirty.add(client)

    def _on_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)
        self._dirty.discard(client)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Often from another thread (a publish): only note it; the loop writes.
        self._dirty.add(client)
        if not self.on_loop:
            self._wake()

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self.on_loop:
            self._watch(sock, client, write=False)

    def _watch(self, sock: Any, client: paho.Client, write: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            key = self._sel.get_key(sock)
        except (KeyError, ValueError):
            return
        if key.events != events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.modify(sock, events, client)

    # ----------------------------------------------------------------- the loop

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY_S
        while not self._stopping:
            timeout = MISC_EVERY_S
            now = time.monotonic()
            if self._calls or self._dirty or (self._timers and self._timers[0][0] <= now):
                timeout = 0.0
            elif self._timers:
                timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
            try:
                events = self._sel.select(timeout)
            except (OSError, ValueError):
                if self._stopping:
                    return
                raise
            started = time.monotonic()
            for key, mask in events:
                client = key.data
                if client is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                if mask & selectors.EVENT_READ:
                    self._read(client)
                if mask & selectors.EVENT_WRITE:
                    self._guarded(client.loop_write)
            while self._calls:
                self._guarded(self._calls.popleft())
            now = time.monotonic()
            ran = 0
            while self._timers and self._timers[0][0] <= now and ran < TIMERS_PER_TURN:
                _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    ran += 1
                    self._guarded(timer.fn)
            if now >= next_misc:
                next_misc = now + MISC_EVERY_S
                for c in list(self._clients):
                    self._guarded(c.loop_misc)
            self._flush()
            self.busy_s += time.monotonic() - started

    def _read(self, client: paho.Client) -> None:
        self._guarded(client.loop_read)
        sock = client.socket()
        # TLS may hold decrypted bytes the selector cannot see.
        for _ in range(MAX_SSL_READS):
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                break
            self._guarded(client.loop_read)
            sock = client.socket()

    def _flush(self) -> None:
        while self._dirty:
            client = self._dirty.pop()
            sock = client.socket()
            if sock is None:
                continue
            if client.want_write():
                self._guarded(client.loop_write)
            sock = client.socket()
            if sock is not None:
                self._watch(sock, client, write=client.want_write())

    def _guarded(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # one device's bug must not stop the others
            log.exception("simulator loop: %s failed", getattr(fn, "__qualname__", fn))
