"""KubeEdge device twin messages (DeviceTwinUpdate, DeviceTwinDelta, get/result).

    {"event_id": "…", "timestamp": ms,
     "twin": {prop: {"expected"|"actual": {"value": "…", "metadata": {"timestamp": ms}},
                     "metadata": {"type": "string"}}},
     "delta": {prop: "…"}}            # only in …/twin/update/delta

Twin values are strings shorter than 512 bytes (UTF-8); property names follow
Kubernetes naming.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.messages import Code, ProtocolError, dumps, loads

MAX_VALUE_BYTES = 511  # "under 512 bytes"
PROPERTY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class TwinError(ValueError):
    """A twin property or value KubeEdge would not accept."""


def check_value(prop: str, value: str) -> str:
    if not PROPERTY_RE.fullmatch(prop):
        raise TwinError(f"twin property name {prop!r} is not valid")
    if not isinstance(value, str):
        raise TwinError(f"twin property {prop!r}: value must be a string")
    size = len(value.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        raise TwinError(f"twin property {prop!r}: value is {size} bytes; the limit is 511")
    return value


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_update(actual: Mapping[str, str], *, event_id: str | None = None) -> bytes:
    """A DeviceTwinUpdate reporting `actual` values (to `…/twin/update`)."""
    ts = now_ms()
    twin = {
        prop: {
            "actual": {"value": check_value(prop, value), "metadata": {"timestamp": ts}},
            "metadata": {"type": "string"},
        }
        for prop, value in actual.items()
    }
    return dumps({"event_id": event_id or str(uuid.uuid4()), "timestamp": ts, "twin": twin})


def encode_get(*, event_id: str | None = None) -> bytes:
    """Ask for the whole twin (to `…/twin/get`; the answer comes on `…/twin/get/result`)."""
    return dumps({"event_id": event_id or str(uuid.uuid4()), "timestamp": now_ms()})


@dataclass(frozen=True)
class TwinDocument:
    event_id: str
    timestamp: int
    expected: dict[str, str] = field(default_factory=dict)
    actual: dict[str, str] = field(default_factory=dict)
    delta: dict[str, str] = field(default_factory=dict)

    def desired(self) -> dict[str, str]:
        """What the cloud wants: the delta when there is one, else every expected value."""
        return dict(self.delta) if self.delta else dict(self.expected)


def _value(entry: Any, side: str, prop: str) -> str | None:
    part = entry.get(side)
    if part is None:
        return None
    if not isinstance(part, dict):
        raise ProtocolError(Code.MALFORMED, f"twin.{prop}.{side} must be an object")
    value = part.get("value")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(Code.MALFORMED, f"twin.{prop}.{side}.value must be a string")
    try:
        return check_value(prop, value)
    except TwinError as exc:
        raise ProtocolError(Code.MALFORMED, str(exc)) from exc


def decode(payload: bytes) -> TwinDocument:
    """Parse an update, delta or get result; raises ProtocolError with what is wrong."""
    obj = loads(payload)
    if not isinstance(obj, dict):
        raise ProtocolError(Code.MALFORMED, "a twin message must be a JSON object")
    event_id = obj.get("event_id", "")
    timestamp = obj.get("timestamp", 0)
    if not isinstance(event_id, str):
        raise ProtocolError(Code.MALFORMED, "event_id must be a string")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise ProtocolError(Code.MALFORMED, "timestamp must be an integer (ms)")
    twin = obj.get("twin")
    twin = {} if twin is None else twin
    if not isinstance(twin, dict):
        raise ProtocolError(Code.MALFORMED, "twin must be an object")
    expected: dict[str, str] = {}
    actual: dict[str, str] = {}
    for prop, entry in twin.items():
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ProtocolError(Code.MALFORMED, f"twin.{prop} must be an object")
        meta = entry.get("metadata")
        if isinstance(meta, dict) and meta.get("type") == "deleted":
            continue
        exp = _value(entry, "expected", prop)
        act = _value(entry, "actual", prop)
        if exp is not None:
            expected[prop] = exp
        if act is not None:
            actual[prop] = act
    delta_obj = obj.get("delta")
    delta_obj = {} if delta_obj is None else delta_obj
    if not isinstance(delta_obj, dict):
        raise ProtocolError(Code.MALFORMED, "delta must be an object of strings")
    delta: dict[str, str] = {}
    for prop, value in delta_obj.items():
        if not isinstance(value, str):
            raise ProtocolError(Code.MALFORMED, f"delta.{prop} must be a string")
        try:
            delta[prop] = check_value(prop, value)
        except TwinError as exc:
            raise ProtocolError(Code.MALFORMED, str(exc)) from exc
    return TwinDocument(event_id, timestamp, expected, actual, delta)
