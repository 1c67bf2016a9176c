"""Pacing for downloads: a token bucket (``update.max_kbps``) and a capped, jittered backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """At most `rate` bytes a second on average, with bursts of at most `burst` bytes.

    `take(n)` is called after `n` bytes arrived and sleeps for the debt; the sleep is
    on `cancel`, so a cancel ends it at once. A rate of 0 means no cap.
    """

    def __init__(
        self,
        rate_bytes_s: float,
        burst_bytes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = float(rate_bytes_s)
        # A small burst keeps the measured rate close to the cap even for small files.
        self.burst = float(burst_bytes if burst_bytes is not None else max(1024.0, self.rate / 20))
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    @property
    def capped(self) -> bool:
        return self.rate > 0

    def read_size(self, wanted: int) -> int:
        """How much to ask the socket for at once, so one read never overshoots far."""
        if not self.capped:
            return wanted
        return max(1, min(wanted, int(self.burst)))

    def take(self, n: int, cancel: threading.Event) -> None:
        if not self.capped or n <= 0:
            return
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            cancel.wait(-self._tokens / self.rate)


def kbps_to_bytes_s(kbps: float) -> float:
    """`update.max_kbps` is in kbit/s (1 kbit = 1000 bit), as link speeds are quoted."""
    return kbps * 1000.0 / 8.0


__all__ = ["TokenBucket", "kbps_to_bytes_s"]
