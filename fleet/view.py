"""The live picture of the fleet: one `DeviceRow` per device, fed by the broker.

    view = FleetView(client).start()      # returns once the retained messages arrived
    view.rows(group="line-2")
    view.wait(lambda v: v.row("press-17").online, timeout_s=10)

It subscribes to the four per-device streams (`agent.protocol.topics.fleet_filter`):
retained `status` and `state`, `telemetry` and `events`, parses them with the typed
messages in `agent/protocol/`, drops repeats by `seq` per device and stream (delivery is
at least once), and calls its listeners after each update. A malformed message from one
device is counted (`malformed`) and logged once per device; it never breaks the view.

`start()` knows the retained messages are in when a marker it publishes after the
SUBACKs comes back: the broker queues it behind the retained messages of the same
subscriber (mosquitto does; elsewhere the bound `settle_s` applies).

status, state and telemetry are subscribed at QoS 0 (latest values; see `latest_qos`),
events at QoS 1. Each device's fields have one owner, `_data`, updated on the MQTT
network thread; readers take `_lock` and get frozen DeviceRows built on demand.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.protocol.messages import (
    EventMessage,
    ProtocolError,
    Status,
    TelemetryMessage,
    loads,
)
from agent.protocol.state import ReportedState
from agent.protocol.topics import ROOT, DeviceTopics, console_reply, device_of, fleet_filter
from agent.protocol.update import Phase
from agent.strictjson import finite_float, refuse_constant, unique_keys
from fleet.mqtt import FleetClient, Message
from fleet.ports import DeviceRow, ViewKind, ViewListener

log = logging.getLogger(__name__)

STREAMS = ("status", "state", "telemetry", "events")
_PHASES = {p.value for p in Phase}
_FINAL = {p.value for p in Phase if p.final}


def sync_topic(console_id: str) -> str:
    """Where `start()` publishes its marker: beside the console's reply topic (the
    console's own subtree, so the recommended ACL already lets it read and write)."""
    return str(console_reply(console_id)).rsplit("/", 1)[0] + "/sync"


class FleetView:
    """Implements `fleet.ports.View`; thread-safe."""

    def __init__(
        self,
        client: FleetClient,
        *,
        shared_group: str | None = None,
        latest_qos: int = 0,
        device: str | None = None,
    ) -> None:
        """`device`: follow that one device only (its four topics), for commands
        to one device that need only its status."""
        self.client = client
        self.device = None if device is None else DeviceTopics(device).device
        self.shared_group = shared_group if shared_group is not None else (
            client.config.shared_group
        )  # fmt: skip
        # Telemetry is periodic and latest-value: QoS 0 halves its packets at scale.
        # status, state and telemetry are latest-value (the retained ones come again
        # on every subscribe): QoS 0. At QoS 1 a default mosquitto (20 in flight, 1,000
        # queued a client) drops the retained messages of all but ~1,000 devices at
        # start (measured: 1,020 rows of 10,000). Events keep QoS 1: they are news.
        self.latest_qos = latest_qos
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # One owner for each device's fields: `_data` (updated on the network thread);
        # `_rows` caches the frozen DeviceRow built from it until the next change, so
        # 20,000 retained messages at start cost no row objects until someone asks.
        self._data: dict[str, dict[str, Any]] = {}
        self._rows: dict[str, DeviceRow] = {}
        self._seq: dict[tuple[str, str], int] = {}  # (device, stream) -> highest seq
        self._final_job: dict[str, str] = {}  # device -> last job seen in a final phase
        self._listeners: list[ViewListener] = []
        self.malformed = 0
        self.repeats = 0
        self._malformed_devices: set[str] = set()
        self._marker = ""
        self._synced = threading.Event()
        self._telemetry_synced = threading.Event()
        self.telemetry_settled = False
        self.following = False
        self.started = False
        self.settled = False
        self._retained = False  # of the message being parsed (network thread only)

    # ------------------------------------------------------------------ lifecycle

    def start(
        self, settle_s: float = 10.0, telemetry_s: float = 0.0, follow: bool = True
    ) -> FleetView:
        """Subscribe and return once the retained status and state arrived (or after
        `settle_s`; `settled` says which); with `follow`, then subscribe to telemetry
        and events too and wait up to `telemetry_s` for the retained telemetry.

        Telemetry comes only after the status/state marker: its retained burst (one
        report per device, ~1 KB each) is the largest and the slowest to read, and a
        broker with default queue limits drops part of it at 10,000 devices (measured:
        ~2,000 of 10,000 kept by a default mosquitto 2.0), so the table must not wait
        behind it; the reports that were dropped come again live within an interval."""
        if self.started:
            return self
        client = self.client
        self._marker = uuid.uuid4().hex
        # The markers travel like the retained messages (same QoS), so behind them.
        client.subscribe(sync_topic(client.console_id), self._on_marker, qos=self.latest_qos)
        for stream in ("status", "state"):
            client.subscribe(self._filter(stream), self._on_message, qos=self.latest_qos)
        client.device_lookup = self.row
        self.started = True
        self._publish_marker("state")
        self.settled = self._synced.wait(settle_s)
        if not self.settled:
            log.warning("the retained messages did not settle within %.1f s", settle_s)
        if follow:
            self.follow(telemetry_s)
        return self

    def follow(self, telemetry_s: float = 0.0) -> bool:
        """Subscribe to telemetry and events (once); wait up to `telemetry_s` for the
        retained telemetry to have arrived (`telemetry_settled`)."""
        if not self.following:
            self.following = True
            for stream in ("telemetry", "events"):
                value = self._filter(stream)
                if stream == "telemetry" and self.shared_group:
                    value = f"$share/{self.shared_group}/{value}"
                qos = 1 if stream == "events" else self.latest_qos
                self.client.subscribe(value, self._on_message, qos=qos)
            self._publish_marker("telemetry")
        self.telemetry_settled = self._telemetry_synced.wait(telemetry_s)
        return self.telemetry_settled

    def _filter(self, stream: str) -> str:
        if self.device is not None:
            return f"{DeviceTopics(self.device).root}/{stream}"
        return str(fleet_filter(stream))

    def _publish_marker(self, what: str) -> None:
        topic = sync_topic(self.client.console_id)
        self.client.publish(topic, f"{self._marker}:{what}".encode("ascii"), qos=1, wait=False)

    def close(self) -> None:
        if self.client.device_lookup == self.row:
            self.client.device_lookup = None

    # ------------------------------------------------------------------ View

    def _row_locked(self, device_id: str) -> DeviceRow | None:
        row = self._rows.get(device_id)
        if row is None:
            data = self._data.get(device_id)
            if data is None:
                return None
            row = self._rows[device_id] = DeviceRow(**data)
        return row

    def rows(self, group: str | None = None) -> list[DeviceRow]:
        with self._lock:
            rows = [self._row_locked(d) or DeviceRow(d) for d in self._data]
        if group is not None:
            rows = [r for r in rows if group in r.groups]
        rows.sort(key=lambda r: r.device_id)
        return rows

    def row(self, device_id: str) -> DeviceRow | None:
        with self._lock:
            return self._row_locked(device_id)

    def add_listener(self, fn: ViewListener) -> Callable[[], None]:
        with self._lock:
            self._listeners = [*self._listeners, fn]

        def remove() -> None:
            with self._lock:
                self._listeners = [f for f in self._listeners if f is not fn]

        return remove

    def wait(self, pred: Callable[[FleetView], bool], timeout_s: float) -> bool:
        """Until `pred(self)` holds (checked after every update), at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not pred(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                self._changed.wait(min(left, 0.25))
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    # ------------------------------------------------------------------ messages

    def _on_marker(self, message: Message) -> None:
        text = message.payload.decode("ascii", "replace")
        if text == f"{self._marker}:state":
            self._synced.set()
        elif text == f"{self._marker}:telemetry":
            self._telemetry_synced.set()

    def _on_message(self, message: Message) -> None:
        levels = message.topic.split("/")
        if len(levels) != 4 or levels[0] != _ROOT_LEVELS[0] or levels[1] != _ROOT_LEVELS[1]:
            return
        device, stream = levels[2], levels[3]
        if device not in self._data and device_of(message.topic) is None:
            return  # not a valid device id
        try:
            if not message.payload:  # a retained message cleared: the device is gone
                if stream == "status":
                    self._forget(device)
                return
            body = read_json(message.payload)
            self._retained = message.retain
            kind, typed, changes = _PARSERS[stream](self, device, body)
        except ProtocolError as exc:
            self._malformed(device, stream, exc.message)
            return
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            self._malformed(device, stream, f"{type(exc).__name__}: {exc}")
            return
        if changes is None:  # a repeat
            return
        changes["seen_at"] = time.time()
        with self._lock:
            data = self._data.get(device)
            if data is None:
                data = self._data[device] = {"device_id": device}
            data.update(changes)
            self._rows.pop(device, None)  # built again when asked for
            listeners = self._listeners
            self._changed.notify_all()
        for fn in listeners:
            try:
                fn(kind, device, typed)
            except Exception:
                log.exception("view listener %r failed", fn)

    def _forget(self, device: str) -> None:
        with self._lock:
            self._rows.pop(device, None)
            self._data.pop(device, None)
            for stream in STREAMS:
                self._seq.pop((device, stream), None)
            self._changed.notify_all()

    def _malformed(self, device: str, stream: str, why: str) -> None:
        self.malformed += 1
        if device not in self._malformed_devices:
            self._malformed_devices.add(device)
            log.warning("malformed %s from %s (ignored; later ones are counted): %s",
                        stream, device, why)  # fmt: skip

    def _fresh(self, device: str, stream: str, seq: int) -> bool:
        """False for a repeat. A counter that starts again at 1 (the device's state
        directory was reset) is taken as new."""
        key = (device, stream)
        highest = self._seq.get(key, 0)
        if seq <= highest and seq != 1:
            self.repeats += 1
            return False
        self._seq[key] = seq
        return True

    # One parser per stream: (kind, typed message, row changes or None for a repeat).

    def _status(self, device: str, body: Any) -> tuple[ViewKind, Any, dict[str, Any] | None]:
        status = Status.from_json(body)
        since: float | None = status.since or None
        if status.state == "offline" and "last will" in status.reason:
            # A last will is written when the device connects, so its `since` is the
            # connect time: the broker sending it now is the real moment (unknown for
            # a retained one).
            since = None if self._retained else time.time()
        changes: dict[str, Any] = {
            "online": status.state == "online",
            "since": since,
            "reason": status.reason,
            "topics": status.topics,
        }
        if status.agent_version:
            changes["agent_version"] = status.agent_version
        return "status", status, changes

    def _state(self, device: str, body: Any) -> tuple[ViewKind, Any, dict[str, Any] | None]:
        state, changes = _state_changes(body)
        job, phase = changes.get("job"), changes.get("phase")
        if job is not None and phase is not None and not self._phase_moves(device, job, phase):
            changes.pop("job")
            changes.pop("phase")
        return "state", state, changes

    def _telemetry(self, device: str, body: Any) -> tuple[ViewKind, Any, dict[str, Any] | None]:
        msg = TelemetryMessage.from_json(body)
        if not self._fresh(device, "telemetry", msg.seq):
            return "telemetry", msg, None
        interval = _obj(msg.inference.get("interval"))
        live = _obj((msg.model or {}).get("live"))
        shadow = _obj((msg.model or {}).get("shadow"))
        requests, errors = _num(interval.get("requests")), _num(interval.get("errors"))
        error_rate = _num(live.get("error_rate"))
        if error_rate is None and requests:
            error_rate = (errors or 0.0) / requests
        temps = [v for v in _obj(msg.system.get("temperatures_c")).values() if _num(v) is not None]
        # The interval's exact p95 when it saw requests, else the watchdog's recent one.
        p95 = _num(interval.get("p95_ms")) if requests else None
        changes: dict[str, Any] = {
            "p95_ms": p95 if p95 is not None else _num(live.get("p95_ms")),
            "rate_per_s": _num(interval.get("rate_per_s")),
            "error_rate": error_rate,
            "rss_mb": _num(msg.system.get("rss_mb")),
            "temperature_c": max(temps) if temps else None,
            "outbox_messages": _int(msg.outbox.get("messages")),
            "telemetry_ts": msg.ts or None,
            "live": live,
            "shadow": shadow,
        }
        model = _obj(msg.model)
        if model.get("version"):
            changes["model_name"] = _str(model.get("name"))
            changes["model_version"] = _str(model.get("version"))
            if model.get("variant"):  # an agent before variants sends none
                changes["variant"] = _str(model.get("variant"))
                changes["variant_reason"] = _str(model.get("variant_reason"))
        return "telemetry", msg, changes

    def _event(self, device: str, body: Any) -> tuple[ViewKind, Any, dict[str, Any] | None]:
        event = EventMessage.from_json(body)
        if not self._fresh(device, "events", event.seq):
            return "event", event, None
        changes: dict[str, Any] = {}
        if event.kind.startswith("update."):
            phase = event.kind[len("update.") :]
            job = event.data.get("job")
            if phase in _PHASES and isinstance(job, str) and self._phase_moves(device, job, phase):
                changes["job"], changes["phase"] = job, phase
        return "event", event, changes

    def _phase_moves(self, device: str, job: str, phase: str) -> bool:
        """Events travel through the device's outbox, the retained state does not, so an
        old `update.trial` can arrive after the state said `committed`: once a job is
        seen final, a non-final phase of that job is stale."""
        if phase in _FINAL:
            self._final_job[device] = job
            return True
        return self._final_job.get(device) != job


_ROOT_LEVELS = ROOT.split("/")


def read_json(payload: bytes) -> Any:
    """Strict enough for what devices send, at the speed 10,000 of them need: UTF-8,
    no NaN/Infinity, no repeated keys. A lone surrogate can only come in as a `\\u`
    escape, so only a payload holding one goes through the full checks of
    `agent.protocol.messages.loads` (which also bound the depth)."""
    if b"\\u" in payload:
        return loads(payload)
    try:
        return _DECODER.decode(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError("command.malformed", f"payload is not UTF-8: {exc}") from None
    except RecursionError:
        raise ProtocolError("command.malformed", "payload nests too deeply") from None


# The device's own strict-JSON hooks (agent/strictjson.py): one rule for NaN, overflow
# and repeated keys on both sides of the wire.
_DECODER = json.JSONDecoder(
    parse_constant=refuse_constant, parse_float=finite_float, object_pairs_hook=unique_keys
)
_PARSERS: dict[str, Callable[[FleetView, str, Any], tuple[ViewKind, Any, dict[str, Any] | None]]]
_PARSERS = {
    "status": FleetView._status,
    "state": FleetView._state,
    "telemetry": FleetView._telemetry,
    "events": FleetView._event,
}


def _state_changes(body: Any) -> tuple[ReportedState, dict[str, Any]]:
    """The row fields the retained `state` carries (agent.protocol.state)."""
    state = ReportedState.from_json(body)
    model = state.model
    changes: dict[str, Any] = {
        "model_name": model.name or None if model else None,
        "model_version": model.version if model else None,
        "model_sha256": model.sha256 or None if model else None,
        "variant": model.variant or None if model else None,
        "variant_reason": model.variant_reason or None if model else None,
        "previous_version": state.last_known_good.version if state.last_known_good else None,
        "groups": state.groups,
        "health": state.health.word,
    }
    if state.agent_version:
        changes["agent_version"] = state.agent_version
    update = state.update
    if update is not None and update.known_phase is not None:
        changes["job"], changes["phase"] = update.job, update.phase
    return state, changes


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


__all__ = ["FleetView", "sync_topic"]
