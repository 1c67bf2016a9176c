"""A small typed wrapper over paho-mqtt 2.x: one logical connection, kept up.

paho's own types, return codes and callbacks stay in here; the rest of the agent sees
`Message`, `Delivery` and the exceptions below. One network thread owns the socket:
it connects, runs paho's loop, and after a loss waits a capped, jittered backoff and
starts over with a fresh paho client (no stale session state to reconcile: the
outbox is what remembers unacknowledged messages).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol.broker import ack_lock, call_safely, describe_connect_error, no_delay
from agent.protocol.topics import Topic, TopicFilter, is_legacy_command_filter

log = logging.getLogger(__name__)


class MqttError(Exception):
    """Base of everything this wrapper raises."""


class NotConnectedError(MqttError):
    """The broker is not reachable right now; the caller decides whether to retry."""


class PublishError(MqttError):
    """paho refused to queue a message (bad topic, payload too large...)."""


@dataclass(frozen=True)
class Will:
    topic: Topic
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class ClientSettings:
    host: str
    port: int
    client_id: str
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_inflight: int = 32
    will: Will | None = None
    # MQTT v5 Maximum Packet Size: the broker drops bigger messages for this client
    # instead of making it read them into memory (0: no limit; 3.1.1 has none).
    max_packet_bytes: int = 0


@dataclass(frozen=True)
class Message:
    """An incoming PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Ack:
    """The broker's answer to one QoS 1 publish."""

    ok: bool
    reason: str
    code: int  # MQTT v5 reason code; 0 on 3.1.1 (which has none) or "success"
    permanent: bool = False  # a refusal that a retry will not fix (e.g. not authorized)


AckCallback = Callable[[Ack], None]
# Refusals that will not change on retry: not authorized, topic name invalid,
# payload format invalid, packet too large.
_PERMANENT = frozenset({0x87, 0x90, 0x95, 0x99})


class Backoff:
    """Doubling waits from `low` to `high`, each drawn from [wait/2, wait] ("equal jitter")."""

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low, self.high = low, max(low, high)
        self._next = low
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._next = self.low

    def next(self) -> float:
        wait = self._next
        self._next = min(self._next * 2, self.high)
        return wait / 2 + self._rng.uniform(0, wait / 2)


class _Session:
    """Per-connection bookkeeping: which publish ids wait for which callback."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Every QoS 1 mid in flight, registered before its PUBACK can be matched; the
        # callback is None for publishes whose sender does not wait for the ack.
        self.waiting: dict[int, AckCallback | None] = {}
        self.subscribing: dict[int, tuple[list[str], Callable[[list[str]], None] | None]] = {}
        self.early_subacks: dict[int, list[ReasonCode]] = {}
        self.closed = False
        self.refused = False  # the broker answered CONNECT with a failure


class MqttClient:
    """Keeps one connection to the broker; thread-safe `publish` and `subscribe`.

    Callbacks run on the network thread and must be quick: `on_connect` once per
    established connection, `on_disconnect` once per loss, `on_message` per PUBLISH.
    """

    def __init__(
        self,
        settings: ClientSettings,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_message = on_message
        self._paho: paho.Client | None = None
        self._session = _Session()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.connections = 0  # established connections so far (for status and tests)
        self.unowned_acks = 0  # acks for no registered message id (QoS 0 sends included)
        # Fail now, not on the first publish.
        ack_lock(paho.Client(CallbackAPIVersion.VERSION2), MqttError)
        self.last_error = ""

    # ----------------------------------------------------------------- public

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def is_v5(self) -> bool:
        return self.settings.protocol == "5"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-net", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        topic: Topic,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        on_ack: AckCallback | None = None,
    ) -> None:
        """Queue one message on the current connection; raise NotConnectedError if none.

        `on_ack` gets the broker's verdict (QoS 1), or a failed Ack if the connection
        is lost first. It runs on the network thread.
        """
        client, session = self._paho, self._session
        if client is None or not self._connected.is_set():
            raise NotConnectedError(f"not connected to {self._where()}")
        properties = None
        if correlation_data is not None and self.is_v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation_data
        # paho holds `_out_message_mutex` while it matches a PUBACK and calls on_publish
        # (`_handle_pubackcomp`), and publish() assigns the mid under it too; holding it
        # (an RLock) across publish() and our registration means no ack can be looked
        # up before its mid is registered. Every QoS 1 mid is registered, with or
        # without a callback, so an ack nobody owns is recognised and dropped instead
        # of waiting for a later publish that reuses its mid after the 65,535 wrap.
        lost = False
        with ack_lock(client, MqttError):
            try:
                info = client.publish(
                    str(topic), payload, qos=qos, retain=retain, properties=properties
                )
            except (ValueError, TypeError) as exc:
                raise PublishError(f"cannot publish to {topic}: {exc}") from exc
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                raise NotConnectedError(f"connection to {self._where()} was just lost")
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise PublishError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
            if qos > 0:
                with session.lock:
                    if session.closed:
                        lost = True
                    else:
                        session.waiting[info.mid] = on_ack
        if on_ack is None:
            return
        if qos == 0:
            on_ack(Ack(True, "sent (QoS 0)", 0))
        elif lost:
            on_ack(Ack(False, "connection lost", -1))

    def pending_acks(self) -> int:
        """QoS 1 publishes on the current connection still waiting for their PUBACK."""
        session = self._session
        with session.lock:
            return len(session.waiting)

    def subscribe(
        self,
        filters: Sequence[TopicFilter],
        qos: int = 1,
        on_done: Callable[[list[str]], None] | None = None,
    ) -> None:
        """Subscribe; `on_done` gets the refused filters (usually none) once the broker
        answered, on the network thread."""
        client, session = self._paho, self._session
        if client is None or not self._connected.is_set():
            raise NotConnectedError(f"not connected to {self._where()}")
        rc, mid = client.subscribe([(str(f), qos) for f in filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnectedError(f"cannot subscribe: {paho.error_string(rc)}")
        names = [str(f) for f in filters]
        with session.lock:
            codes = session.early_subacks.pop(mid, None)
            if codes is None:
                session.subscribing[mid] = (names, on_done)
        if codes is not None:
            self._suback(names, codes, on_done)

    def unsubscribe(self, filters: Sequence[TopicFilter]) -> None:
        """Drop subscriptions on the current connection (a later connection subscribes
        only to what its `on_connect` asks for anyway)."""
        client = self._paho
        if client is None or not self._connected.is_set():
            raise NotConnectedError(f"not connected to {self._where()}")
        rc, _ = client.unsubscribe([str(f) for f in filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnectedError(f"cannot unsubscribe: {paho.error_string(rc)}")

    def disconnect(self) -> None:
        """Close the connection cleanly now (no last will); the loop then reconnects
        unless `stop` was called."""
        client = self._paho
        if client is not None:
            client.disconnect()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----------------------------------------------------------------- network thread

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _new_paho(self) -> paho.Client:
        s = self.settings
        v5 = self.is_v5
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.suppress_exceptions = True  # a bug in a callback must not kill the loop
        client.max_inflight_messages_set(s.max_inflight + 16)  # room for replies and status
        client.max_queued_messages_set(0)
        client.connect_timeout = s.connect_timeout_s
        # Other threads publish; only this thread may write to the socket, so make
        # paho queue the packet and wake our select instead of writing in place.
        client.on_socket_register_write = _noop_socket
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set_context(s.tls)
        if s.will is not None:
            client.will_set(str(s.will.topic), s.will.payload, s.will.qos, s.will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        return client

    def _connect_properties(self) -> Properties | None:
        if not self.settings.max_packet_bytes:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = self.settings.max_packet_bytes
        return props

    def _run(self) -> None:
        while not self._stopping.is_set():
            client = self._new_paho()
            self._session = _Session()
            self._paho = client
            try:
                if self.is_v5:
                    client.connect(
                        self.settings.host,
                        self.settings.port,
                        self.settings.keepalive_s,
                        clean_start=True,
                        properties=self._connect_properties(),
                    )
                else:
                    client.connect(
                        self.settings.host, self.settings.port, self.settings.keepalive_s
                    )
            except (OSError, ValueError) as exc:  # socket, DNS, TLS and timeout errors
                self._note_error(
                    f"cannot connect to {self._where()}: {describe_connect_error(exc)}"
                )
            else:
                no_delay(client)
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS
                while rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    rc = client.loop(timeout=0.5)
                    if self._stopping.is_set() and not client.want_write():
                        break
                if self._stopping.is_set():
                    # Let a queued DISCONNECT (and the offline status) go out.
                    deadline = time.monotonic() + 1.0
                    while client.want_write() and time.monotonic() < deadline:
                        if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                            break
                if client.socket() is not None:
                    client.disconnect()
            self._lost(
                "stopping" if self._stopping.is_set() else self.last_error or "connection lost"
            )
            if self._stopping.is_set():
                break
            wait = self._backoff.next()
            log.debug("reconnecting to %s in %.2f s", self._where(), wait)
            self._stopping.wait(wait)
        self._paho = None

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("%s", message)
        self.last_error = message

    def _lost(self, why: str) -> None:
        session = self._session
        with session.lock:
            session.closed = True
            waiting, session.waiting = session.waiting, {}
        for callback in waiting.values():
            if callback is not None:
                call_safely(callback, Ack(False, f"connection lost before PUBACK: {why}", -1))
        if self._connected.is_set():
            self._connected.clear()
            log.info("disconnected from %s: %s", self._where(), why)
            if self._on_disconnect is not None:
                call_safely(self._on_disconnect, why)

    # paho callbacks (network thread) --------------------------------------------

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._session.refused = True
            self._note_error(f"broker {self._where()} refused the connection: {reason}")
            return
        self._backoff.reset()
        self.connections += 1
        self.last_error = ""
        self._connected.set()
        log.info("connected to %s (MQTT %s)", self._where(), self.settings.protocol)
        if self._on_connect is not None:
            call_safely(self._on_connect)

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        # After a refused CONNECT the refusal is the news, not the closed socket.
        if reason.is_failure and not self._stopping.is_set() and not self._session.refused:
            self._note_error(f"connection to {self._where()} lost: {reason}")

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropping a message whose topic is not UTF-8")
            return
        response_topic = None
        correlation = None
        props = getattr(msg, "properties", None)
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
        message = Message(
            topic=topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=response_topic if isinstance(response_topic, str) else None,
            correlation_data=bytes(correlation) if correlation is not None else None,
        )
        if self._on_message is not None:
            call_safely(self._on_message, message)

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        value = int(reason.value) if isinstance(reason, ReasonCode) else 0
        ack = Ack(
            ok=value < 0x80,
            reason=str(reason) if isinstance(reason, ReasonCode) else "Success",
            code=value,
            permanent=value in _PERMANENT,
        )
        session = self._session
        with session.lock:
            owned = mid in session.waiting
            callback = session.waiting.pop(mid, None)
        if not owned:
            # QoS 0 sends land here too; a PUBACK for a mid not in flight is the
            # broker's mistake (or a duplicate) and must not settle a later message.
            self.unowned_acks += 1
            log.debug("ignoring an ack for message id %d that nothing waits for", mid)
            return
        if callback is not None:
            call_safely(callback, ack)

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        session = self._session
        with session.lock:
            pending = session.subscribing.pop(mid, None)
            if pending is None:
                session.early_subacks[mid] = list(reasons)
        if pending is not None:
            self._suback(pending[0], list(reasons), pending[1])

    def _suback(
        self,
        names: list[str],
        reasons: list[ReasonCode],
        on_done: Callable[[list[str]], None] | None,
    ) -> None:
        refused = [name for name, r in zip(names, reasons, strict=False) if r.is_failure]
        # The dotted command spelling is refused by NATS, and that is expected there
        # (the link says so once, at info); any other refusal is worth a warning.
        alarming = [name for name in refused if not is_legacy_command_filter(name)]
        if alarming:
            log.warning("broker refused subscription(s) to %s", ", ".join(alarming))
        if on_done is not None:
            call_safely(on_done, refused)


def _noop_socket(client: paho.Client, userdata: Any, sock: Any) -> None:
    return None
