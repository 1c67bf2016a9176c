"""N light simulated devices in one process, for tests and benchmarks (`edge-fleet simulate`).

    with Simulator("127.0.0.1", 1883, 50, console_keys=[pub], groups=["a", "b"]) as sim:
        sim.device_ids              # ["sim-0000", ...]
        sim.set_profile("2.0.0", p95_factor=1.5, devices=sim.device_ids[:2])
        sim.offline("sim-0003"); sim.online("sim-0003")

Each device speaks the agent's MQTT contract with the agent's own protocol code
(`agent.protocol`: topics, messages, canonical JSON and signatures, update arguments
and phases): retained `status` and `state`, `telemetry` with `model.live` figures
like the update watchdog's, `events` with `seq`, and the commands (`ping`, `status`,
`config.get/set`, `logs`, `infer` with a fixed answer, `deploy`, `rollback`,
`update.status`, `update.cancel`) checked and refused with the device's codes.
Deploys run the real phases and download the bundle for real (HTTP GET from the
deploy's `url`, or MQTT chunks through the `need` protocol), unless `skip_download`.

Connections: by default one MQTT connection per device, with its own last will, as
a real device has: faithful, fine to ~1,000 devices. With `connections=K` the
devices share K connections: 10,000 devices cost 10,000 sets of subscriptions but
not 10,000 sockets. The trade-off: there is no per-device last will, so a device
taken offline says so with an explicit retained `offline` status, and a simulator
process that dies leaves its devices "online" until it comes back. All connections
run on one loop thread (fleet/simulate/loop.py); telemetry is spread over the interval.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.topics import device_id as check_device_id
from agent.protocol.topics import group_name, parse_command_topic
from agent.protocol.update import Phase
from agent.signing import parse_public_key
from fleet.simulate.commands import Incoming, SignatureCache
from fleet.simulate.device import CRASH_PHASES, DEFAULT_LATENCY, Knobs, Shared, Signal, SimDevice
from fleet.simulate.loop import Reactor

log = logging.getLogger(__name__)

T = TypeVar("T")
SUBSCRIBE_BATCH = 200  # topics per SUBSCRIBE packet
Groups = Sequence[str] | Mapping[str, Iterable[int | str]] | Callable[[int, str], Iterable[str]]
KeyLike = Ed25519PublicKey | str | os.PathLike[str] | bytes


class _Conn:
    """One MQTT connection carrying one device (with its last will) or many."""

    def __init__(self, sim: Simulator, name: str, devices: list[SimDevice], own: bool) -> None:
        self.sim = sim
        self.reactor = sim.reactor
        self.devices = {d.id: d for d in devices}
        self.own = own
        self.connected = False
        self.wanted = True
        self.members: dict[str, list[SimDevice]] = {}
        for d in devices:
            for g in d.groups:
                self.members.setdefault(g, []).append(d)
        self.bundles: dict[str, SimDevice] = {}
        self._pending: set[int] = set()
        self._backoff = 0.2
        v5 = sim.protocol == "5"
        self.v5 = v5
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=name,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        if sim.username is not None:
            first = devices[0].id
            user = sim.username(first) if callable(sim.username) else sim.username
            secret = sim.password(first) if callable(sim.password) else sim.password
            self.client.username_pw_set(user, secret)
        if sim.tls is not None:
            ca, cert, key = sim.tls
            self.client.tls_set(
                ca_certs=None if ca is None else str(ca),
                certfile=None if cert is None else str(cert),
                keyfile=None if key is None else str(key),
            )
        if own:
            d = devices[0]
            self.client.will_set(str(d.topics.status), d.will(), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.reactor.attach(self.client)
        for d in devices:
            d.port = self

    # ----------------------------------------------------------------- connecting

    def connect(self) -> None:
        if not self.wanted:
            return
        try:
            if self.v5:
                self.client.connect(self.sim.host, self.sim.port, keepalive=30, clean_start=True)
            else:
                self.client.connect(self.sim.host, self.sim.port, keepalive=30)
        except OSError as exc:
            log.debug("%s: connect failed: %s", self.client._client_id, exc)
            self._retry()

    def _retry(self) -> None:
        delay, self._backoff = self._backoff, min(self._backoff * 2, 5.0)
        self.reactor.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if not self.wanted or self.connected:
            return
        try:
            self.client.reconnect()
        except OSError as exc:
            log.debug("reconnect failed: %s", exc)
            self._retry()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.warning("simulator connection refused: %s", rc)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # no Nagle: replies in milliseconds
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connected = True
        self._backoff = 0.2
        topics: list[str] = []
        seen: set[str] = set()
        for d in self.devices.values():
            for f in d.filters():
                if f not in seen:
                    seen.add(f)
                    topics.append(f)
        topics += list(self.bundles)
        self._pending.clear()
        for i in range(0, len(topics), SUBSCRIBE_BATCH):
            _, mid = client.subscribe([(t, 1) for t in topics[i : i + SUBSCRIBE_BATCH]])
            if mid is not None:
                self._pending.add(mid)
        if not self._pending:
            self._ready()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if mid in self._pending:
            self._pending.discard(mid)
            refused = [c for c in codes if getattr(c, "is_failure", False)]
            if refused:
                log.warning("broker refused %d simulator subscription(s)", len(refused))
            if not self._pending:
                self._ready()

    def _ready(self) -> None:
        for d in self.devices.values():
            if d.online:
                d.announce()
                self.sim._announced(d)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected = False
        for d in self.devices.values():
            d.stop_telemetry()
        if self.wanted and not self.sim.closing:
            self._retry()

    # ----------------------------------------------------------------- messages

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        holder = self.bundles.get(topic)
        if holder is not None:
            holder.on_chunk(bytes(msg.payload))
            return
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        incoming = Incoming(topic, bytes(msg.payload), response, correlation)
        route = parse_command_topic(topic)
        if route is None:
            return
        if route.scope == "group":
            for d in self.members.get(route.target, ()):
                d.on_command(incoming)
        else:
            device = self.devices.get(route.target)
            if device is not None:
                device.on_command(incoming)

    # ----------------------------------------------------------------- the Port

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        props = None
        if self.v5 and correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=props)

    def subscribe(self, topic: str, device: SimDevice) -> None:
        self.bundles[topic] = device
        if self.connected:
            self.client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        if self.bundles.pop(topic, None) is not None and self.connected:
            self.client.unsubscribe(topic)

    def drop(self, device: SimDevice, reason: str) -> None:
        if self.own:
            # A connection lost without DISCONNECT: the broker publishes the last will.
            self.wanted = False
            sock = self.client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        elif self.connected:
            self.client.publish(
                str(device.topics.status), device.offline_status(reason), qos=1, retain=True
            )

    def restore(self, device: SimDevice) -> None:
        if self.own:
            self.wanted = True
            self._backoff = 0.05
            if not self.connected:
                self.reactor.call_later(0.05, self._reconnect)
        elif self.connected:
            device.announce()

    def close(self) -> list[paho.MQTTMessageInfo]:
        """A clean stop, part 1: `offline` (agent stopped) for each device; the caller
        waits for their PUBACKs before the DISCONNECT (closing a socket with unread
        PUBACKs in it resets the connection, and the broker may drop what it had not
        read yet)."""
        self.wanted = False
        sent = []
        if self.connected:
            for d in self.devices.values():
                if d.online:
                    sent.append(
                        self.client.publish(
                            str(d.topics.status), d.offline_status("agent stopped"), 1, True
                        )
                    )
        return sent


def _load_key(key: KeyLike) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, bytes):
        return parse_public_key(key)
    return parse_public_key(Path(key).read_bytes(), origin=str(key))


class Simulator:
    def __init__(
        self,
        host: str,
        port: int,
        n: int,
        *,
        prefix: str = "sim",
        groups: Groups | None = None,
        console_keys: Iterable[KeyLike] = (),
        require_signature: bool | None = None,
        protocol: str = "5",
        tls: tuple[Path | str | None, Path | str | None, Path | str | None] | None = None,
        username: str | Callable[[str], str] | None = None,
        password: str | Callable[[str], str] | None = None,
        connections: int | None = None,
        device_ids: Sequence[str] | None = None,
        telemetry_interval_s: float = 10.0,
        seed: int = 0,
        fail_rate: float = 0.0,
        crash_rate: float = 0.0,
        hang_rate: float = 0.0,
        hang_phase: str = "downloading",
        crash_phase: str | None = None,
        latency: float | Mapping[str, float] = 0.05,
        trial_s: float | None = None,
        crash_downtime_s: float = 0.5,
        skip_download: bool = False,
        live_since_swap: bool = False,
        profile: Mapping[str, Mapping[str, Any]] | None = None,
        model: tuple[str, str] = ("sim-model", "1.0.0"),
        download_workers: int = 8,
        start_timeout_s: float = 60.0,
        old_agents: Iterable[str] = (),
    ) -> None:
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f'protocol must be "5" or "3.1.1", not {protocol!r}')
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        if connections is not None and connections < 1:
            raise ValueError(f"connections must be at least 1, not {connections}")
        self.host, self.port, self.protocol = host, port, protocol
        self.tls, self.username, self.password = tls, username, password
        self.start_timeout_s = start_timeout_s
        keys = [_load_key(k) for k in console_keys]
        signed = bool(keys) if require_signature is None else require_signature
        if signed and not keys:
            raise ValueError("require_signature needs console_keys (as the agent refuses to start)")
        self._profiles: list[tuple[str, Signal, frozenset[str] | None]] = []
        self.downloads = ThreadPoolExecutor(download_workers, "sim-download")
        self.shared = Shared(
            signatures=SignatureCache(keys) if signed else None,
            downloads=self.downloads,
            seed=seed,
            telemetry_interval_s=telemetry_interval_s,
            model_name=model[0],
            model_version=model[1],
            profile=self._signal,
            rng=random.Random(seed),
        )
        lat = dict(DEFAULT_LATENCY)
        if isinstance(latency, Mapping):
            lat.update({str(k): float(v) for k, v in latency.items()})
        else:
            lat = {k: float(latency) for k in lat}
        self.knobs = Knobs(
            fail_rate=fail_rate, crash_rate=crash_rate, hang_rate=hang_rate,
            hang_phase=_phase(hang_phase, PHASES), crash_phase=_phase(crash_phase, CRASHES), crash_downtime_s=crash_downtime_s, latency=lat,
            trial_s=trial_s, skip_download=skip_download, live_since_swap=live_since_swap,
        )  # fmt: skip
        width = max(4, len(str(n - 1)))
        if device_ids is not None and len(device_ids) != n:
            raise ValueError(f"device_ids names {len(device_ids)} devices, not n = {n}")
        names = device_ids or [f"{prefix}-{i:0{width}d}" for i in range(n)]
        ids = [check_device_id(d) for d in names]
        if len(set(ids)) != n:
            raise ValueError("device_ids repeats a name")
        member = _groups_of(groups, ids)
        self.devices: dict[str, SimDevice] = {
            d: SimDevice(d, member[d], self.shared, self.knobs) for d in ids
        }
        for d in old_agents:
            if d not in self.devices:
                raise ValueError(f"old_agents names {d!r}, which is not a simulated device")
            self.devices[d].old_agent = True
        for version, given in (profile or {}).items():
            spec = dict(given)
            devices = spec.pop("devices", None)
            self.set_profile(version, devices=devices, **spec)
        self.reactor = Reactor()
        tag = os.urandom(3).hex()
        devs = list(self.devices.values())
        if connections is None:
            self.conns = [_Conn(self, d.id, [d], own=True) for d in devs]
        else:
            k = min(connections, n)
            self.conns = [
                _Conn(self, f"{prefix}-mux{i}-{tag}", devs[i::k], own=False) for i in range(k)
            ]
        self.closing = False
        self._online_cond = threading.Condition()
        self._announced_ids: set[str] = set()
        self._started = False

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Simulator:
        self.start()
        if not self.wait_online(self.start_timeout_s):
            missing = len(self.devices) - len(self._announced_ids)
            self.close()
            raise RuntimeError(
                f"{missing} simulated devices did not come online within "
                f"{self.start_timeout_s:g} s (broker {self.host}:{self.port})"
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Simulator:
        self._started = True
        self.reactor.start()
        for c in self.conns:
            self.reactor.call_soon(c.connect)
        return self

    def wait_online(self, timeout_s: float) -> bool:
        """True once every device announced itself (online status and state sent)."""
        deadline = time.monotonic() + timeout_s
        with self._online_cond:
            while len(self._announced_ids) < len(self.devices):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._online_cond.wait(min(left, 0.2))
        return True

    def _announced(self, device: SimDevice) -> None:
        with self._online_cond:
            self._announced_ids.add(device.id)
            self._online_cond.notify_all()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._started:
            sent: list[paho.MQTTMessageInfo] = []
            with contextlib.suppress(Exception):
                sent = self.call(self._close_conns, timeout_s=5.0)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not all(i.is_published() for i in sent):
                time.sleep(0.02)
            with contextlib.suppress(Exception):
                self.call(self._disconnect, timeout_s=5.0)
            # paho closes each socket once its DISCONNECT is written.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(c.client.socket() for c in self.conns):
                time.sleep(0.02)
        self.reactor.stop()
        for c in self.conns:
            with contextlib.suppress(Exception):
                sock = c.client.socket()
                if sock is not None:
                    sock.close()
        self.downloads.shutdown(wait=False, cancel_futures=True)

    def _close_conns(self) -> list[paho.MQTTMessageInfo]:
        return [info for c in self.conns for info in c.close()]

    def _disconnect(self) -> None:
        for c in self.conns:
            c.client.disconnect()

    # ----------------------------------------------------------------- knobs

    @property
    def device_ids(self) -> list[str]:
        return list(self.devices)

    def call(self, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
        """Run `fn` on the simulator's loop thread and return its result."""
        if self.reactor.on_loop:
            return fn()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.reactor.call_soon(run)
        return future.result(timeout_s)

    def _pick(self, devices: Iterable[str] | None) -> list[SimDevice]:
        if devices is None:
            return list(self.devices.values())
        out = []
        for d in devices:
            if d not in self.devices:
                raise KeyError(f"no simulated device {d!r}")
            out.append(self.devices[d])
        return out

    def offline(self, device: str, reason: str = "connection lost (simulated)") -> None:
        d = self._pick([device])[0]
        self.call(lambda: d.take_offline(reason))

    def online(self, device: str) -> None:
        d = self._pick([device])[0]
        self.call(d.bring_online)

    def set_knobs(self, devices: Iterable[str] | None = None, **changes: Any) -> None:
        """Per device at run time: fail_rate, crash_rate, crash_phase (verifying,
        validating or trial), hang_rate, hang_phase, latency (a number or {phase: s}),
        trial_s, crash_downtime_s, skip_download, live_since_swap."""
        picked = self._pick(devices)

        def apply() -> None:
            for d in picked:
                knobs = replace(d.knobs, latency=dict(d.knobs.latency))
                for key, value in changes.items():
                    if key == "latency":
                        if isinstance(value, Mapping):
                            knobs.latency.update({str(k): float(v) for k, v in value.items()})
                        else:
                            knobs.latency = {k: float(value) for k in knobs.latency}
                    elif key in ("hang_phase", "crash_phase"):
                        setattr(
                            knobs, key, _phase(value, CRASHES if key == "crash_phase" else PHASES)
                        )
                    elif hasattr(knobs, key):
                        setattr(knobs, key, value)
                    else:
                        raise TypeError(f"no knob {key!r}")
                d.knobs = knobs

        self.call(apply)

    def set_profile(
        self, version: str, devices: Iterable[str] | None = None, **signal: float
    ) -> None:
        """How `version` behaves (p95_factor, error_rate, agreement, nonfinite_rate),
        on `devices` or on all; a later call wins over an earlier one."""
        sig = Signal(**{k: float(v) for k, v in signal.items()})
        picked = None if devices is None else frozenset(d.id for d in self._pick(devices))
        self._profiles.append((version, sig, picked))

    def _signal(self, device: str, version: str) -> Signal:
        for v, sig, devices in reversed(self._profiles):
            if v == version and (devices is None or device in devices):
                return sig
        return Signal()

    # ----------------------------------------------------------------- reading (tests)

    def state(self, device: str) -> dict[str, Any]:
        d = self._pick([device])[0]
        return self.call(d.state)

    def stats(self) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "connections": len(self.conns),
            "connected": sum(1 for c in self.conns if c.connected),
            "online": sum(1 for d in self.devices.values() if d.online),
            "sent": dict(self.shared.sent),
            "loop_busy_s": round(self.reactor.busy_s, 3),
        }


PHASES = tuple(p.value for p in Phase if not p.final and p is not Phase.ACCEPTED)
CRASHES = tuple(p.value for p in CRASH_PHASES)


def _phase(value: str | None, allowed: tuple[str, ...]) -> Any:
    if value is None and allowed is CRASHES:
        return None
    if value not in allowed:
        raise ValueError(f"phase {value!r} must be one of {', '.join(allowed)}")
    return value


def _groups_of(groups: Groups | None, ids: list[str]) -> dict[str, tuple[str, ...]]:
    """Sequence: device i in groups[i % len]; mapping: group -> device indexes or ids;
    callable(index, device_id) -> its groups."""
    out: dict[str, list[str]] = {d: [] for d in ids}
    if groups is None:
        pass
    elif isinstance(groups, Mapping):
        for g, members in groups.items():
            group_name(g)
            for m in members:
                d = ids[m] if isinstance(m, int) else m
                if d not in out:
                    raise KeyError(f"group {g!r}: no simulated device {m!r}")
                out[d].append(g)
    elif callable(groups):
        for i, d in enumerate(ids):
            out[d] = [group_name(g) for g in groups(i, d)]
    else:
        names = [group_name(g) for g in groups]
        if names:
            for i, d in enumerate(ids):
                out[d] = [names[i % len(names)]]
    return {d: tuple(dict.fromkeys(gs)) for d, gs in out.items()}


__all__ = ["Knobs", "Signal", "SimDevice", "Simulator"]
