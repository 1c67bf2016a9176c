"""A poor link for tests: a TCP proxy that throttles, delays and cuts connections.

    with PoorLink(("127.0.0.1", server_port), rate_bytes_s=50_000, cut_after=[20_000, 40_000]) as link:
        url = f"http://127.0.0.1:{link.port}/bundle"

* `rate_bytes_s`: each direction of each connection at most this many bytes a second;
* `delay_s`: every piece forwarded waits this long first (latency, both ways);
* `cut_after`: the k-th connection is cut (both sockets closed, no goodbye) once it
  carried `cut_after[k]` bytes towards the client; connections past the list are left alone;
* `cut_every`: with `seed`, each connection is cut after a random number of bytes
  drawn from [cut_every/2, cut_every*3/2] (a link that keeps dropping);
* `refuse(seconds)`: connections made in the next `seconds` are closed at once.

`cut()` cuts every open connection now (a radio that went away). Counters: `connections`,
`cuts`, `bytes_down`. Real sockets, real threads; nothing is simulated in the client.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
import time
from types import TracebackType


class PoorLink:
    def __init__(
        self,
        target: tuple[str, int],
        *,
        rate_bytes_s: float = 0.0,
        delay_s: float = 0.0,
        cut_after: list[int] | None = None,
        cut_every: int = 0,
        seed: int = 1,
    ) -> None:
        self.target = target
        self.rate = rate_bytes_s
        self.delay = delay_s
        self.cut_after = list(cut_after or [])
        self.cut_every = cut_every
        self._rng = random.Random(seed)
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port: int = self._server.getsockname()[1]
        self.connections = 0
        self.cuts = 0
        self.bytes_down = 0
        self._refuse_until = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="poorlink", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def start(self) -> PoorLink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        with contextlib.suppress(OSError):
            self._server.close()
        self.cut(count=False)
        self._thread.join(5)

    def refuse(self, seconds: float) -> None:
        self._refuse_until = time.monotonic() + seconds

    def cut(self, count: bool = True) -> None:
        with self._lock:
            socks, self._open = list(self._open), set()
            if count and socks:
                self.cuts += 1
        for s in socks:
            _hard_close(s)

    def __enter__(self) -> PoorLink:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- inside

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                _hard_close(client)
                continue
            with self._lock:
                k = self.connections
                self.connections += 1
                limit = self.cut_after[k] if k < len(self.cut_after) else None
                if limit is None and self.cut_every:
                    limit = self._rng.randint(self.cut_every // 2, self.cut_every * 3 // 2)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, limit), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, limit: int | None) -> None:
        down = 0
        cut = False
        budgets = {client: _Pace(self.rate), upstream: _Pace(self.rate)}
        try:
            while not self._stopping.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for src in ready:
                    dst = upstream if src is client else client
                    data = src.recv(
                        4096 if not self.rate else max(1, min(4096, int(self.rate / 20)))
                    )
                    if not data:
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        if src is upstream:
                            return None  # the server is done: close gracefully (below)
                        continue
                    if src is upstream and limit is not None and down + len(data) >= limit:
                        data = data[: max(0, limit - down)]
                        if data:
                            client.sendall(data)
                            self.bytes_down += len(data)
                        with self._lock:
                            self.cuts += 1
                        cut = True
                        return None
                    if self.delay:
                        time.sleep(self.delay)
                    budgets[src].wait(len(data))
                    dst.sendall(data)
                    if src is upstream:
                        down += len(data)
                        self.bytes_down += len(data)
        except OSError:
            cut = True
            return None
        finally:
            with self._lock:
                self._open -= {client, upstream}
            for s in (client, upstream):
                if cut:
                    _hard_close(s)
                else:
                    with contextlib.suppress(OSError):
                        s.close()
        return None


class _Pace:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next = time.monotonic()

    def wait(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.next = max(self.next, now)
        if self.next > now:
            time.sleep(self.next - now)
        self.next += n / self.rate


def _hard_close(s: socket.socket) -> None:
    # RST rather than FIN: the peer sees a dropped link, not a clean end.
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        s.close()


__all__ = ["PoorLink"]
