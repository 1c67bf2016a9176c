"""The last N log lines in memory, for the `logs` command."""

from __future__ import annotations

import collections
import logging
import threading


class LogRing(logging.Handler):
    def __init__(self, capacity: int) -> None:
        super().__init__(level=logging.DEBUG)
        self.capacity = capacity
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=capacity)
        self._ring_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._ring_lock:
            self._lines.append((record.levelno, line))

    def tail(self, n: int, min_level: int = logging.NOTSET) -> list[str]:
        with self._ring_lock:
            lines = [line for level, line in self._lines if level >= min_level]
        return lines[-n:] if n else []

    def install(self) -> None:
        logging.getLogger().addHandler(self)

    def remove(self) -> None:
        logging.getLogger().removeHandler(self)
