"""Admission of request bodies before they are read.

A body is read only if it fits: under the memory headroom (the RSS watcher's soft
limit minus the RSS it last saw, minus the bodies already admitted and not yet
answered) and under `api.max_body_inflight_mb` across all connections. Reading
first and judging later is how 8 clients with 5 MB bodies took a 160 MB agent to
a gigabyte.
"""

from __future__ import annotations

import threading
from typing import Protocol

from agent.errors import OverloadedError

MB = 1024 * 1024
# What one JSON number costs once decoded: a Python float or int (24-32 bytes) and
# its list slot (8), before numpy copies it into the array.
JSON_VALUE_BYTES = 40


class _Limits(Protocol):
    @property
    def soft_limit_bytes(self) -> int: ...


class MemoryGauge(Protocol):
    """What admission reads of the RSS watcher (agent.memory.RssWatcher)."""

    @property
    def rss(self) -> int: ...

    @property
    def budget(self) -> _Limits: ...


def json_cost(head: bytes | bytearray) -> int:
    """Bytes a JSON request head costs once decoded, beyond the body itself."""
    return (head.count(b",") + 1) * JSON_VALUE_BYTES


class BodyBudget:
    """Owns the count of body bytes admitted and not yet released, and of the bytes
    of registered shared-memory regions (agent/api/shm.py: pinned until unregistered,
    they take headroom like a body but not `api.max_body_inflight_mb`)."""

    def __init__(self, gauge: MemoryGauge, limit_bytes: int) -> None:
        self.gauge = gauge
        self.limit_bytes = limit_bytes
        self._inflight = 0
        self._pinned = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def pinned(self) -> int:
        return self._pinned

    def pin(self, size: int, what: str) -> int:
        """Count `size` long-lived bytes in, or raise OverloadedError naming the figures."""
        with self._lock:
            soft = self.gauge.budget.soft_limit_bytes
            rss = self.gauge.rss
            headroom = soft - rss - self._inflight - self._pinned
            if size > headroom:
                raise OverloadedError(
                    f"{what} of {size / MB:.2f} MB does not fit: agent RSS {rss / MB:.1f} MB + "
                    f"{(self._inflight + self._pinned) / MB:.2f} MB of bodies and shared memory "
                    f"leaves {max(headroom, 0) / MB:.2f} MB under the soft limit of "
                    f"{soft / MB:.1f} MB (memory.soft_limit_mb / memory.max_mb)"
                )
            self._pinned += size
        return size

    def unpin(self, size: int) -> None:
        with self._lock:
            self._pinned -= size

    def reserve(self, size: int, what: str = "request body") -> int:
        """Count `size` bytes in or raise OverloadedError naming the figures."""
        if size <= 0:
            return 0
        with self._lock:
            inflight = self._inflight
            if inflight + size > self.limit_bytes:
                raise OverloadedError(
                    f"{what} of {size / MB:.2f} MB does not fit now: {inflight / MB:.2f} MB of "
                    f"request bodies are in flight and the limit is {self.limit_bytes / MB:.2f} "
                    "MB (api.max_body_inflight_mb); retry later"
                )
            soft = self.gauge.budget.soft_limit_bytes
            rss = self.gauge.rss
            headroom = soft - rss - inflight - self._pinned
            if size > headroom:
                raise OverloadedError(
                    f"{what} of {size / MB:.2f} MB does not fit now: agent RSS {rss / MB:.1f} MB "
                    f"+ {inflight / MB:.2f} MB of bodies in flight"
                    + (f" + {self._pinned / MB:.2f} MB of shared memory" if self._pinned else "")
                    + f" leaves {max(headroom, 0) / MB:.2f} MB under the soft limit of "
                    f"{soft / MB:.1f} MB (memory.soft_limit_mb / memory.max_mb); retry later"
                )
            self._inflight = inflight + size
        return size

    def release(self, size: int) -> None:
        if size > 0:
            with self._lock:
                self._inflight -= size
