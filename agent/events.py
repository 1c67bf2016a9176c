"""In-process event bus: model lifecycle and refusals, fanned out to subscribers.

The MQTT link subscribes to forward events to the fleet; the log always gets them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind: str  # e.g. "model.loaded", "model.refused", "overloaded"
    reason: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "data": self.data, "ts": self.ts}


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self.recent: list[Event] = []

    def subscribe(self, fn: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(fn)

    def emit(self, kind: str, reason: str, **data: Any) -> Event:
        event = Event(kind, reason, data)
        log.info("event %s: %s", kind, reason)
        with self._lock:
            self.recent = [*self.recent[-99:], event]
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(event)
            except Exception:  # a broken subscriber must not stop the agent
                log.exception("event subscriber %r failed", fn)
        return event
