"""What a device page shows that the view does not keep: the device's recent events and
the models it was seen serving, while this server runs (bounded per device). The
record adds the model changes rollouts made (fleet/dashboard/api.py merges them)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fleet.ports import View

EVENTS_KEPT = 100
MODELS_KEPT = 50


class DeviceLog:
    def __init__(self, view: View, *, events_kept: int = EVENTS_KEPT) -> None:
        self.events_kept = events_kept
        self._lock = threading.Lock()
        self._events: dict[str, deque[dict[str, Any]]] = {}
        self._models: dict[str, deque[dict[str, Any]]] = {}
        self._remove: Callable[[], None] | None = view.add_listener(self._on_view)

    def close(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def _on_view(self, kind: str, device: str, message: Any) -> None:
        if kind == "event":
            item = {
                "ts": getattr(message, "ts", None),
                "kind": getattr(message, "kind", ""),
                "reason": getattr(message, "reason", ""),
                "data": getattr(message, "data", {}) or {},
            }
            with self._lock:
                q = self._events.get(device)
                if q is None:
                    q = self._events[device] = deque(maxlen=self.events_kept)
                q.append(item)
        elif kind == "state":
            model = getattr(message, "model", None)
            version = getattr(model, "version", None) if model is not None else None
            if not version:
                return
            sha = getattr(model, "sha256", None) or None
            with self._lock:
                q = self._models.get(device)
                if q is None:
                    q = self._models[device] = deque(maxlen=MODELS_KEPT)
                if q and q[-1]["version"] == version and q[-1]["sha256"] == sha:
                    return
                q.append({"ts": time.time(), "version": version, "sha256": sha, "via": None})

    def events(self, device: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events.get(device, ()))

    def models(self, device: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m) for m in self._models.get(device, ())]
