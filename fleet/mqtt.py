"""The console's connection to the broker: a thin typed wrapper over paho-mqtt 2.x.

    client = FleetClient(FleetConfig.load(None)).connect()
    reply = client.request("press-17", "ping")       # signed, bound to press-17, expiring
    client.close()

`FleetClient` implements `fleet.ports.Commander`. Every command gets a new uuid `id`,
`to` = the device, `issued_at`/`expires_at`, and the ed25519 signature over its
canonical body; the reply is asked for on this console's own reply topic (MQTT v5
response topic + correlation data, or `reply_to` on 3.1.1), subscribed before the first
command goes out. Pending replies have one owner, `_pending` (a dict under `_lock`):
each leaves it exactly once, resolved by its reply, failed at its deadline by the timer
thread, or failed when the connection drops or the client closes.

paho's loop runs on its own thread (`loop_start`); message callbacks and the futures'
done-callbacks run there and must be quick.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqttc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol.broker import ack_lock, call_safely, describe_connect_error, no_delay
from agent.protocol.canonical import sign_body
from agent.protocol.messages import ProtocolError, Reply, dumps, loads
from agent.protocol.topics import (
    Topic,
    TopicError,
    TopicFilter,
    command_name,
    command_topic,
    console_reply,
    device_id,
    portability_problem,
)
from agent.signing import key_id as public_key_id
from fleet.config import FleetConfig
from fleet.errors import FleetCode, FleetError
from fleet.ports import DeviceRow

log = logging.getLogger(__name__)

SHARE_PREFIX = "$share/"
SEND_WINDOW = 100  # QoS 1 messages handed to paho and not yet acknowledged (see publish)
MAX_ROUTES = 200_000  # topics whose matching subscriptions are remembered (4 a device)


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming PUBLISH, as the console's parts see it."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    correlation_data: bytes | None = None


MessageCallback = Callable[[Message], None]
# After a connect, subscriptions the broker refused are asked for again after these
# pauses before the refusal stands (an ACL refusal is then reported 1.5 s later).
RESUBSCRIBE_AFTER_S = (0.5, 1.0)
SentHook = Callable[[Mapping[str, Any], str], None]  # (signed command body, target)
ReplyHook = Callable[[str, Reply], None]  # (command id, reply)
DeviceLookup = Callable[[str], DeviceRow | None]


@dataclass(slots=True)
class _Pending:
    command_id: str
    target: str
    name: str
    timeout_s: float
    future: Future[Reply]


@dataclass(slots=True)
class _Subscription:
    filter: str  # as subscribed (may carry $share/<group>/)
    match: TopicFilter  # what incoming topics are matched against
    callback: MessageCallback
    qos: int


def _match_filter(value: str) -> TopicFilter:
    """The topic filter proper of `$share/<group>/<filter>` (MQTT v5 4.8.2)."""
    if value.startswith(SHARE_PREFIX):
        rest = value[len(SHARE_PREFIX) :]
        group, sep, inner = rest.partition("/")
        if not group or not sep or "+" in group or "#" in group:
            raise TopicError(f"shared subscription {value!r} must be $share/<group>/<filter>")
        return TopicFilter(inner)
    return TopicFilter(value)


class FleetClient:
    """One connection to the broker for one console; thread-safe."""

    def __init__(self, config: FleetConfig, *, key: Ed25519PrivateKey | None = None) -> None:
        self.config = config
        self.console_id = config.console_id
        self.reply_topic: Topic = console_reply(config.console_id)
        self._key = key
        self._key_error: FleetError | None = None
        if key is None and config.key_path is not None:
            try:
                self._key = config.signing_key()
            except FleetError as exc:  # commands fail with it; watching needs no key
                self._key_error = exc
        self.key_id = "" if self._key is None else public_key_id(self._key.public_key())
        self.on_sent: SentHook | None = None
        self.on_reply: ReplyHook | None = None
        self.device_lookup: DeviceLookup | None = None  # FleetView sets it (offline, last seen)
        self.malformed_replies = 0
        self.unmatched_replies = 0

        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # (monotonic deadline, n, id)
        self._counter = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._timer: threading.Thread | None = None

        self._subs: list[_Subscription] = []
        self._routes: tuple[list[_Subscription], dict[str, list[_Subscription]]] = (self._subs, {})
        # SUBACK callbacks by message id; early ones (before registration) kept apart.
        self._subacks: dict[int, Callable[[list[ReasonCode]], None]] = {}
        self._early_subacks: dict[int, list[ReasonCode]] = {}
        self._acks: dict[int, Callable[[ReasonCode | None], None] | None] = {}
        # QoS 1 messages waiting for room in the send window: (topic, payload, retain,
        # properties, on_ack), in order.
        self._backlog: collections.deque[
            tuple[str, bytes, bool, Properties | None, Callable[[ReasonCode | None], None] | None]
        ] = collections.deque()
        self._paho: mqttc.Client | None = None
        self._connected = threading.Event()
        self._connack: tuple[bool, str] | None = None
        self._connack_event = threading.Event()
        self._closed = False
        self._reply_sub = _Subscription(
            str(self.reply_topic), TopicFilter(str(self.reply_topic)), lambda m: None, 1
        )
        self._subscribed = threading.Event()  # the SUBACK after a connect came
        self._reply_refused = False
        self._probe: tuple[str, threading.Event] | None = None
        self._connect_listeners: list[Callable[[], None]] = []
        self.connections = 0

    # ------------------------------------------------------------------ connection

    @property
    def paho(self) -> mqttc.Client:
        """The paho client (for fleet/transfer.py's ChunkSender); connect() first."""
        if self._paho is None:
            raise FleetError(FleetCode.BROKER, "not connected: call connect() first")
        return self._paho

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def is_v5(self) -> bool:
        return self.config.protocol == "5"

    def _where(self) -> str:
        return str(self.config.broker)

    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.config
        try:
            ca = cfg.tls_file("ca_file")
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        except ssl.SSLError as exc:
            raise FleetError(
                FleetCode.CONFIG, f"ca_file = {cfg.tls_ca!r} is not a PEM CA bundle: {exc}",
                key="ca_file",
            ) from None  # fmt: skip
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = cfg.tls_file("cert_file"), cfg.tls_file("key_file")
        if cert is not None and key is not None:
            try:
                ctx.load_cert_chain(cert, key)
            except ssl.SSLError as exc:
                raise FleetError(
                    FleetCode.CONFIG,
                    f"cert_file/key_file ({cfg.tls_cert!r}, {cfg.tls_key!r}) are not a "
                    f"matching PEM certificate and key: {exc}",
                    key="cert_file",
                ) from None
        return ctx

    def connect(self, timeout_s: float | None = None) -> FleetClient:
        """Connect, subscribe the reply topic, start the loop; FleetError(console.
        broker_unreachable) naming host:port and why, within `timeout_s`."""
        if self._paho is not None:
            return self
        cfg = self.config
        problem = portability_problem("console_id", cfg.console_id)
        if problem is not None:
            # Its reply topic cannot travel on NATS and the like: say so, but run.
            log.warning("%s", problem)
        timeout = cfg.connect_timeout_s if timeout_s is None else timeout_s
        tls = self._tls_context() if cfg.broker.tls else None
        password = cfg.password()
        client = mqttc.Client(
            CallbackAPIVersion.VERSION2,
            # Unique per connection: two consoles given one console_id (one fleet.toml)
            # must not take each other's session over in a loop.
            client_id=f"edge-fleet-{self.console_id}-{uuid.uuid4().hex[:6]}",
            protocol=mqttc.MQTTv5 if self.is_v5 else mqttc.MQTTv311,
            clean_session=None if self.is_v5 else True,
        )
        client.suppress_exceptions = True  # a bug in a callback must not kill the loop
        # A rollout wave sends thousands of commands at once: let them all be in flight.
        client.max_inflight_messages_set(65000)
        client.max_queued_messages_set(0)
        client.connect_timeout = timeout
        client.reconnect_delay_set(1, 5)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, password)
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self._paho = client
        deadline = time.monotonic() + timeout
        try:
            if self.is_v5:
                client.connect(cfg.broker.host, cfg.broker.port, 30, clean_start=True)
            else:
                client.connect(cfg.broker.host, cfg.broker.port, 30)
        except (OSError, ValueError) as exc:  # DNS, socket, TLS and timeout errors
            self._paho = None
            raise FleetError(
                FleetCode.BROKER,
                f"cannot reach the broker at {self._where()}: {describe_connect_error(exc)}",
                broker=cfg.broker.url,
            ) from None
        no_delay(client)
        client.loop_start()
        if not self._connack_event.wait(max(0.0, deadline - time.monotonic())):
            self._abort_connect()
            raise FleetError(
                FleetCode.BROKER,
                f"the broker at {self._where()} did not answer CONNECT within {timeout:g} s",
                broker=cfg.broker.url,
            )
        assert self._connack is not None
        ok, reason = self._connack
        if not ok:
            self._abort_connect()
            raise FleetError(
                FleetCode.BROKER,
                f"the broker at {self._where()} refused the connection: {reason}",
                broker=cfg.broker.url,
            )
        # The reply topic is subscribed in _handle_connect; wait for its SUBACK so no
        # reply can be sent before the broker routes it here.
        self._wait_connected(max(0.1, deadline - time.monotonic()))
        self._probe_reply_topic(max(0.5, deadline - time.monotonic()))
        with self._lock:
            if self._timer is None:
                self._timer = threading.Thread(
                    target=self._run_timer, name="fleet-timeouts", daemon=True
                )
                self._timer.start()
        return self

    def _probe_reply_topic(self, timeout: float) -> None:
        """Send one message to our own reply topic and wait for it: mosquitto grants a
        subscription its ACL forbids and then delivers nothing, and every command would
        time out for a reason the operator could not see."""
        probe = f"probe-{uuid.uuid4().hex}"
        self._probe = (probe, threading.Event())
        body = dumps({"id": probe, "ok": True, "result": "reply topic probe"})
        try:
            self.publish(self.reply_topic, body, wait=False)
        except FleetError:
            self._abort_connect()
            raise
        if not self._probe[1].wait(timeout):
            self._abort_connect()
            raise FleetError(
                FleetCode.BROKER,
                f"the broker at {self._where()} does not deliver this console's reply topic "
                f"{self.reply_topic} to it within {timeout:g} s: its ACL must let this user "
                f"({self.config.username or 'anonymous'}) read and write edgerun/v1/console/#",
                broker=self.config.broker.url,
            )

    def _wait_connected(self, timeout: float) -> None:
        if not self._subscribed.wait(timeout) or self._reply_refused:
            self._abort_connect()
            why = "refused" if self._reply_refused else f"did not acknowledge within {timeout:g} s"
            raise FleetError(
                FleetCode.BROKER,
                f"the broker at {self._where()} {why} the subscription to this console's "
                f"reply topic {self.reply_topic} (its ACL must let this user read it)",
                broker=self.config.broker.url,
            )

    def _abort_connect(self) -> None:
        client, self._paho = self._paho, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def close(self) -> None:
        """Fail what still waits, disconnect, stop the threads. Idempotent."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._fail_all("the console closed before {target} answered {name}")
        client, self._paho = self._paho, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._connected.clear()
        timer = self._timer
        if timer is not None:
            timer.join(5)

    def __enter__(self) -> FleetClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ pub/sub

    def subscribe(
        self,
        filter: str | TopicFilter,
        callback: MessageCallback,
        qos: int = 1,
        timeout_s: float | None = None,
    ) -> None:
        """Subscribe (also again after every reconnect) and wait for the SUBACK;
        FleetError(console.broker_unreachable) when the broker refuses it."""
        value = str(filter)
        try:
            sub = _Subscription(value, _match_filter(value), callback, qos)
        except TopicError as exc:
            raise FleetError(FleetCode.BAD_INPUT, str(exc)) from None
        with self._lock:
            self._subs = [*self._subs, sub]
        if self._paho is not None and self.connected:
            try:
                self._subscribe_now(
                    [sub], self.config.timeout_s if timeout_s is None else timeout_s
                )
            except FleetError:
                with self._lock:
                    self._subs = [s for s in self._subs if s is not sub]
                raise

    def add_connect_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn` after every reconnect (network thread), once this client's own
        subscriptions are sent again. For parts that subscribe through `.paho` directly
        (a clean session forgets their subscriptions). Returns `remove`."""
        with self._lock:
            self._connect_listeners = [*self._connect_listeners, fn]

        def remove() -> None:
            with self._lock:
                self._connect_listeners = [f for f in self._connect_listeners if f is not fn]

        return remove

    def unsubscribe(self, filter: str | TopicFilter) -> None:
        value = str(filter)
        with self._lock:
            self._subs = [s for s in self._subs if s.filter != value]
        client = self._paho
        if client is not None and self.connected:
            client.unsubscribe(value)

    def _subscribe_now(self, subs: list[_Subscription], timeout: float | None) -> None:
        """Send one SUBSCRIBE; wait for its SUBACK when `timeout` is given."""
        client = self._paho
        if client is None:
            raise self._not_connected()
        done = threading.Event()
        codes: list[ReasonCode] = []

        def answered(reasons: list[ReasonCode]) -> None:
            codes.extend(reasons)
            done.set()

        self._send_subscribe(client, subs, answered)
        if timeout is None:
            return
        if not done.wait(timeout):
            raise FleetError(
                FleetCode.BROKER,
                f"the broker at {self._where()} did not acknowledge the subscription to "
                f"{', '.join(s.filter for s in subs)} within {timeout:g} s",
            )
        refused = [s.filter for s, r in zip(subs, codes, strict=False) if r.is_failure]
        if refused or len(codes) < len(subs):
            why = ", ".join(str(r) for r in codes if r.is_failure) or "no reason given"
            raise FleetError(
                FleetCode.BROKER,
                f"the broker at {self._where()} refused the subscription to "
                f"{', '.join(refused)}: {why} (check its ACL for this console's user)",
            )

    def _send_subscribe(
        self,
        client: mqttc.Client,
        subs: list[_Subscription],
        answered: Callable[[list[ReasonCode]], None],
    ) -> None:
        rc, mid = client.subscribe([(s.filter, s.qos) for s in subs])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise self._not_connected()
        with self._lock:
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._subacks[mid] = answered
        if early is not None:
            answered(early)

    def publish(
        self,
        topic: str | Topic,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        wait: bool = True,
        timeout_s: float | None = None,
        properties: Properties | None = None,
        on_ack: Callable[[ReasonCode | None], None] | None = None,
    ) -> None:
        """Publish; with QoS 1 and `wait`, return once the broker's PUBACK came
        (FleetError when it refuses the message or does not answer in time).
        `on_ack(reason)` (network thread; None when the connection was lost) otherwise."""
        client = self._paho
        if client is None or not self.connected:
            raise self._not_connected()
        done = threading.Event()
        verdict: list[ReasonCode | None] = []

        def acked(reason: ReasonCode | None) -> None:
            verdict.append(reason)
            done.set()

        callback = acked if (wait and qos > 0) else on_ack
        queued = False
        if qos > 0:
            # A rollout wave hands thousands of commands over at once; paho walks its
            # whole queue on every PUBACK (quadratic: 10,000 at once took 4.6 s to be
            # acknowledged; with this window 0.7 s), so at most SEND_WINDOW go to paho
            # and the rest wait here, in order (a waiting publish too), each handed over
            # when an ack makes room.
            with self._lock:
                if self._backlog or len(self._acks) >= SEND_WINDOW:
                    self._backlog.append((str(topic), payload, retain, properties, callback))
                    queued = True
        if not queued:
            self._hand_over(client, str(topic), payload, qos, retain, properties, callback)
        if not (wait and qos > 0):
            return
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        if not done.wait(timeout):
            # A late ack still finds its callback in `_acks` and removes it.
            raise FleetError(
                FleetCode.BROKER,
                f"the broker at {self._where()} did not acknowledge a message on {topic} "
                f"within {timeout:g} s",
            )
        reason = verdict[0]
        if reason is None:
            raise FleetError(
                FleetCode.BROKER,
                f"the connection to {self._where()} was lost before the broker acknowledged "
                f"a message on {topic}",
            )
        if reason.is_failure:
            raise FleetError(
                FleetCode.BROKER, f"the broker at {self._where()} refused a message on {topic}: "
                f"{reason}",
            )  # fmt: skip

    def _hand_over(
        self,
        client: mqttc.Client,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        callback: Callable[[ReasonCode | None], None] | None,
    ) -> None:
        # paho holds `_out_message_mutex` (an RLock) while it matches a PUBACK and calls
        # on_publish; holding it across publish() and our registration means no ack
        # can be looked up before its message id is registered.
        with ack_lock(client, _broker_error):
            try:
                info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            except (ValueError, TypeError) as exc:
                raise FleetError(FleetCode.BAD_INPUT, f"cannot publish to {topic}: {exc}") from None
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                raise self._not_connected()
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise FleetError(
                    FleetCode.BROKER, f"cannot publish to {topic}: {mqttc.error_string(info.rc)}"
                )
            if qos > 0:
                with self._lock:
                    self._acks[info.mid] = callback

    def _send_backlog(self) -> None:
        """Hand waiting messages to paho while the window has room (network thread, on
        an ack; or after a reconnect)."""
        client = self._paho
        while client is not None:
            with self._lock:
                if not self._backlog or len(self._acks) >= SEND_WINDOW:
                    return
                topic, payload, retain, properties, callback = self._backlog.popleft()
            try:
                self._hand_over(client, topic, payload, 1, retain, properties, callback)
            except FleetError as exc:
                log.debug("a queued message to %s was not sent: %s", topic, exc)
                if callback is not None:
                    call_safely(callback, None)

    def _not_connected(self) -> FleetError:
        return FleetError(FleetCode.BROKER, f"not connected to the broker at {self._where()}")

    # ------------------------------------------------------------------ commands

    def pending(self) -> int:
        """Commands still waiting for a reply (tests check that none is left)."""
        with self._lock:
            return len(self._pending)

    def signed_command(
        self, target: str, name: str, args: Mapping[str, Any] | None, lifetime_s: float
    ) -> dict[str, Any]:
        """A new command body for `target`, signed (docs/mqtt.md "The rule a console
        follows"); integers for times, the safe choice for other languages' verifiers."""
        key = self._signing_key()
        now = time.time()
        body: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "name": name,
            "args": dict(args or {}),
            "issued_at": int(now),
            # Rounded up so a command is never shorter-lived than asked for.
            "expires_at": int(now) + max(1, int(-(-lifetime_s // 1))),
            "to": target,
        }
        if not self.is_v5:
            body["reply_to"] = str(self.reply_topic)
        try:
            return sign_body(body, key)
        except (ValueError, TypeError) as exc:  # NaN or a value JSON cannot hold
            raise FleetError(
                FleetCode.BAD_INPUT, f"arguments of {name} cannot be sent as JSON: {exc}"
            ) from None

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is not None:
            return self._key
        if self._key_error is not None:
            raise self._key_error
        return self.config.signing_key()  # raises the "no signing key" error

    def submit(
        self,
        target: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        lifetime_s: float | None = None,
        wait_offline: bool = False,
    ) -> Future[Reply]:
        """Send one signed command to device `target`; the future holds its Reply (ok or
        not) or raises FleetError: console.timeout after `timeout_s`, console.
        device_offline at once when the retained status says it is offline (unless
        `wait_offline`), console.broker_unreachable when the connection drops."""
        future: Future[Reply] = Future()
        timeout = self.config.timeout_s if timeout_s is None else float(timeout_s)
        lifetime = self.config.command_lifetime_s if lifetime_s is None else float(lifetime_s)
        try:
            device_id(target)
            command_name(name)
        except TopicError as exc:
            future.set_exception(FleetError(FleetCode.BAD_INPUT, str(exc)))
            return future
        try:
            row = None if self.device_lookup is None else self.device_lookup(target)
            if not wait_offline:
                self._refuse_offline(target, row)
            body = self.signed_command(target, name, args, lifetime)
            payload = dumps(body)
        except FleetError as exc:
            future.set_exception(exc)
            return future
        except (ValueError, TypeError) as exc:
            future.set_exception(
                FleetError(FleetCode.BAD_INPUT, f"arguments of {name} are not JSON: {exc}")
            )
            return future
        command_id = body["id"]
        pending = _Pending(command_id, target, name, timeout, future)
        with self._lock:
            if self._closed:
                future.set_exception(FleetError(FleetCode.BROKER, "the console is closed"))
                return future
            self._pending[command_id] = pending
            deadline = time.monotonic() + timeout
            if not self._deadlines or deadline < self._deadlines[0][0]:
                self._wake.notify()  # the timer sleeps until the earliest deadline
            heapq.heappush(self._deadlines, (deadline, next(self._counter), command_id))
        properties = None
        if self.is_v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = str(self.reply_topic)
            properties.CorrelationData = command_id.encode("ascii")

        def acked(reason: ReasonCode | None) -> None:
            if reason is not None and reason.is_failure:
                self._fail(
                    command_id,
                    FleetError(
                        FleetCode.BROKER,
                        f"the broker at {self._where()} refused {name} for {target}: {reason}",
                        device=target,
                    ),
                )

        try:
            # An agent of the earlier release takes only the dotted spelling.
            self.publish(
                command_topic(target, name, None if row is None else row.topics),
                payload,
                wait=False,
                properties=properties,
                on_ack=acked,
            )
        except FleetError as exc:
            self._fail(command_id, exc)
            return future
        hook = self.on_sent
        if hook is not None:
            try:
                hook(body, target)
            except Exception:  # the record's trouble must not lose the reply
                log.exception("on_sent hook failed for command %s", command_id)
        return future

    def request(
        self,
        target: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        lifetime_s: float | None = None,
        wait_offline: bool = False,
    ) -> Reply:
        future = self.submit(
            target, name, args, timeout_s=timeout_s, lifetime_s=lifetime_s,
            wait_offline=wait_offline,
        )  # fmt: skip
        # The timer thread resolves every future; the bound here only guards a bug.
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        try:
            return future.result(timeout + 30)
        except FutureTimeout:
            with self._lock:  # never reached unless the timer thread died: forget it
                for command_id, p in list(self._pending.items()):
                    if p.future is future:
                        del self._pending[command_id]
            raise FleetError(
                FleetCode.TIMEOUT, f"no reply from {target} to {name} within {timeout:g} s",
                device=target,
            ) from None  # fmt: skip

    def _refuse_offline(self, target: str, row: DeviceRow | None) -> None:
        if row is not None and row.online is False:
            raise FleetError(
                FleetCode.OFFLINE,
                f"{target} is offline{_since(row)}; not sent (--wait sends it anyway and "
                "waits for the device to come back within the timeout)",
                device=target,
            )

    def _fail(self, command_id: str, error: FleetError) -> None:
        with self._lock:
            pending = self._pending.pop(command_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(error)

    def _fail_all(self, template: str) -> None:
        with self._lock:
            pendings, self._pending = self._pending, {}
            self._deadlines = []
        for p in pendings.values():
            if not p.future.done():
                message = template.format(target=p.target, name=p.name, where=self._where())
                p.future.set_exception(FleetError(FleetCode.BROKER, message, device=p.target))

    def _timeout_error(self, p: _Pending) -> FleetError:
        lookup = self.device_lookup
        row = None if lookup is None else lookup(p.target)
        if row is None:
            known = " it has not been seen on the broker" if lookup is not None else ""
            tail = f";{known}" if known else ""
        elif row.online is False:
            tail = f"; it is offline{_since(row)}"
        else:
            tail = f"; {_last_seen(row)}"
        return FleetError(
            FleetCode.TIMEOUT,
            f"no reply from {p.target} to {p.name} within {p.timeout_s:g} s{tail}",
            device=p.target,
        )

    def _run_timer(self) -> None:
        """Fail each pending command at its deadline (one thread for all of them)."""
        while True:
            expired: list[_Pending] = []
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, _, command_id = heapq.heappop(self._deadlines)
                    p = self._pending.pop(command_id, None)
                    if p is not None:
                        expired.append(p)
                if not expired:
                    wait = self._deadlines[0][0] - now if self._deadlines else 1.0
                    self._wake.wait(min(max(wait, 0.001), 1.0))
                    continue
            for p in expired:
                if not p.future.done():
                    p.future.set_exception(self._timeout_error(p))

    def _on_reply(self, msg: mqttc.MQTTMessage) -> None:
        try:
            reply = Reply.from_json(loads(bytes(msg.payload)))
        except ProtocolError as exc:
            self.malformed_replies += 1
            if self.malformed_replies == 1 or self.malformed_replies % 1000 == 0:
                log.warning("malformed reply on %s (%d so far): %s", msg.topic,
                            self.malformed_replies, exc.message)  # fmt: skip
            return
        command_id = reply.id
        probe = self._probe
        if probe is not None and command_id == probe[0]:
            probe[1].set()
            return
        with self._lock:
            pending = None if command_id is None else self._pending.get(command_id)
            # Any device may write to a console's reply topic (the recommended ACL):
            # only the device the command went to may settle it.
            if pending is not None and reply.device_id not in (None, pending.target):
                pending = None
            if pending is not None:
                del self._pending[pending.command_id]
        if pending is None:
            self.unmatched_replies += 1
            log.debug("reply %s matches no pending command (late, or not ours)", command_id)
            return
        if reply.device_id is None:
            reply = reply.from_device(pending.target)
        if not pending.future.done():
            pending.future.set_result(reply)
        hook = self.on_reply
        if hook is not None and command_id is not None:
            try:
                hook(command_id, reply)
            except Exception:
                log.exception("on_reply hook failed for command %s", command_id)

    # ------------------------------------------------------------------ paho callbacks

    def _handle_connect(
        self, client: mqttc.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._connack = (False, str(reason))
            self._connack_event.set()
            if self.connections:
                log.warning("broker %s refused the reconnection: %s", self._where(), reason)
            return
        self.connections += 1
        self._connack = (True, "")
        self._connack_event.set()
        no_delay(client)
        with self._lock:
            subs = [self._reply_sub, *self._subs]
        reply_sub, generation = subs[0], self.connections

        def finish(refused: list[_Subscription]) -> None:
            if refused:
                log.error("broker %s refused the subscription(s) to %s", self._where(),
                          ", ".join(s.filter for s in refused))  # fmt: skip
            if any(s is reply_sub for s in refused):
                self._reply_refused = True
            else:
                self._connected.set()
            self._subscribed.set()

        def answered(reasons: list[ReasonCode], asked: list[_Subscription], attempt: int) -> None:
            refused = [s for s, r in zip(asked, reasons, strict=False) if r.is_failure]
            refused += asked[len(reasons) :]  # a SUBACK with too few codes grants nothing
            if not refused or attempt >= len(RESUBSCRIBE_AFTER_S):
                finish(refused)
                return
            # A loaded broker refuses for a moment (NATS makes a JetStream consumer for
            # each QoS 1 subscription and refuses when that takes too long): ask again,
            # only for what was refused, unless this connection is gone by then.
            pause = RESUBSCRIBE_AFTER_S[attempt]
            log.warning("broker %s refused the subscription(s) to %s; asking again in %g s",
                        self._where(), ", ".join(s.filter for s in refused), pause)  # fmt: skip

            def again() -> None:
                if self._closed or self.connections != generation or not client.is_connected():
                    return  # a new connection subscribes everything afresh
                try:
                    self._send_subscribe(
                        client, refused, lambda codes: answered(codes, refused, attempt + 1)
                    )
                except FleetError as exc:  # lost meanwhile: the reconnect subscribes anew
                    log.debug("not asking again on %s: %s", self._where(), exc)

            timer = threading.Timer(pause, again)
            timer.daemon = True
            timer.start()

        # Cannot wait here (this is the network thread): the SUBACK sets `_connected`.
        try:
            self._send_subscribe(client, subs, lambda codes: answered(codes, subs, 0))
        except (FleetError, ValueError) as exc:
            log.error("cannot subscribe after connecting to %s: %s", self._where(), exc)
            return
        if self.connections > 1:
            log.info("reconnected to %s", self._where())
            for fn in self._connect_listeners:
                call_safely(fn)

    def _handle_disconnect(
        self, client: mqttc.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        with self._lock:
            acks, self._acks = self._acks, {}
            backlog, self._backlog = self._backlog, collections.deque()
        for callback in [*acks.values(), *(item[4] for item in backlog)]:
            if callback is not None:
                call_safely(callback, None)
        if was and not self._closed:
            log.warning("lost the connection to %s: %s", self._where(), reason)
            self._fail_all(
                "the connection to the broker at {where} was lost before {target} answered {name}"
            )

    def _handle_subscribe(
        self, client: mqttc.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        with self._lock:
            answered = self._subacks.pop(mid, None)
            if answered is None:
                self._early_subacks[mid] = list(reasons)
        if answered is not None:
            call_safely(answered, list(reasons))

    def _handle_publish(
        self, client: mqttc.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        with self._lock:
            callback = self._acks.pop(mid, None)
            more = bool(self._backlog)
        if callback is not None:
            call_safely(callback, reason)
        if more:
            self._send_backlog()

    def _handle_message(self, client: mqttc.Client, userdata: Any, msg: mqttc.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            return
        if topic == self.reply_topic.value:
            self._on_reply(msg)
            return
        subs = self._subs  # replaced, never mutated in place, under the lock
        # Which subscriptions a topic matches, remembered per topic (a fleet sends the
        # same 4 topics per device over and over); forgotten when the subscriptions change.
        cache = self._routes
        if cache[0] is not subs:
            cache = self._routes = (subs, {})
        matched = cache[1].get(topic)
        if matched is None:
            matched = [sub for sub in subs if sub.match.matches(topic)]
            if len(cache[1]) < MAX_ROUTES:
                cache[1][topic] = matched
        if not matched:
            return
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        message = Message(topic, bytes(msg.payload), bool(msg.retain), msg.qos,
                          bytes(corr) if corr is not None else None)  # fmt: skip
        for sub in matched:
            call_safely(sub.callback, message)


def _since(row: DeviceRow) -> str:
    if row.since is None:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.since))
    ago = max(0.0, time.time() - row.since)
    reason = f", {row.reason}" if row.reason else ""
    return f" since {when} ({_ago(ago)} ago{reason})"


def _last_seen(row: DeviceRow) -> str:
    if row.seen_at is None:
        return "nothing heard from it yet"
    return f"last heard from {_ago(max(0.0, time.time() - row.seen_at))} ago"


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 129600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _broker_error(message: str) -> FleetError:
    return FleetError(FleetCode.BROKER, message)
