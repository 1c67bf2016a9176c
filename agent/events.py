"""In-process event bus: model lifecycle and refusals, fanned out to subscribers.

The MQTT link subscribes to forward events to the fleet; the log always gets them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.protocol.events import EventKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    reason: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "data": self.data, "ts": self.ts}


Subscriber = Callable[[Event], None]


class Emit(Protocol):
    """What the parts that report events hold: `EventBus.emit`, typed, so a bare
    string kind is refused by mypy wherever an event is emitted."""

    def __call__(self, kind: EventKind, reason: str, /, **data: Any) -> Any: ...


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self.recent: list[Event] = []

    def subscribe(self, fn: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(fn)

    def emit(self, kind: EventKind, reason: str, /, **data: Any) -> Event:
        # A str that is no kind fails here, where it was emitted (mypy catches most).
        event = Event(EventKind(kind), reason, data)
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
