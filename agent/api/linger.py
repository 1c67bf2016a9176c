"""Closing refused connections without a thread each and without a reset.

Closing a socket with unread input makes the kernel send an RST, which can destroy
the refusal before the client reads it (curl then reports "connection reset" instead
of our 413 or 503). So a refused socket is half-closed and handed here: one thread
drains what the client still sends for a short while, then closes. Refusals cost
no thread of their own, and the number of sockets held here is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
import time

log = logging.getLogger(__name__)

LINGER_S = 2.0
DRAIN_LIMIT = 64 << 20


def send_nowait(conn: socket.socket, data: bytes) -> None:
    """Write what fits in the socket buffer now; a refusal never waits on a client."""
    with contextlib.suppress(OSError):
        conn.send(data, socket.MSG_DONTWAIT)


class Lingerer:
    """Owns every refused socket until it is drained or its time is up."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pending: collections.deque[socket.socket] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._held = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="api-linger", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=LINGER_S + 1)

    def close(self, conn: socket.socket) -> None:
        """Half-close `conn` (its answer is already written) and close it soon."""
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        with self._lock:
            full = self._stopping or not self.alive or self._held >= self.capacity
            if not full:
                self._held += 1
                self._pending.append(conn)
        if full:
            _drain_now(conn)
            conn.close()
            return
        self._wake.set()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        deadlines: dict[socket.socket, float] = {}
        drained: dict[socket.socket, int] = {}
        try:
            while not self._stopping:
                if not deadlines:
                    self._wake.wait()
                self._wake.clear()
                with self._lock:
                    arrived = list(self._pending)
                    self._pending.clear()
                for conn in arrived:
                    deadlines[conn] = time.monotonic() + LINGER_S
                    drained[conn] = 0
                    try:
                        conn.setblocking(False)
                        selector.register(conn, selectors.EVENT_READ)
                    except (OSError, ValueError):
                        self._forget(conn, deadlines, drained, selector)
                for key, _ in selector.select(timeout=0.1):
                    conn = key.fileobj  # type: ignore[assignment]
                    assert isinstance(conn, socket.socket)
                    try:
                        chunk = conn.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    drained[conn] += len(chunk)
                    if not chunk or drained[conn] > DRAIN_LIMIT:
                        self._forget(conn, deadlines, drained, selector)
                now = time.monotonic()
                for conn in [c for c, t in deadlines.items() if t < now]:
                    self._forget(conn, deadlines, drained, selector)
        except Exception:  # never let a refusal take the API down with it
            log.exception("the API's linger thread failed; refused sockets now close at once")
        finally:
            for conn in list(deadlines):
                self._forget(conn, deadlines, drained, selector)
            with self._lock:
                left = list(self._pending)
                self._pending.clear()
                self._held -= len(left)
            for conn in left:
                conn.close()
            selector.close()

    def _forget(
        self,
        conn: socket.socket,
        deadlines: dict[socket.socket, float],
        drained: dict[socket.socket, int],
        selector: selectors.BaseSelector,
    ) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(conn)
        deadlines.pop(conn, None)
        drained.pop(conn, None)
        conn.close()
        with self._lock:
            self._held -= 1


def _drain_now(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while conn.recv(1 << 16, socket.MSG_DONTWAIT):
            pass
