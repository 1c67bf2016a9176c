"""One simulated device: retained status and state, telemetry, events, commands and
the update job, speaking the agent's MQTT contract through `agent.protocol`.

Runs on the simulator's loop thread only (fleet/simulate/loop.py): timers move a job from
phase to phase, so a device costs a few objects, not a thread. What the device sends
goes through its connection (`Port`), which the simulator owns (one MQTT connection
per device, or many devices multiplexed on one).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from agent import __version__
from agent.protocol.events import EventKind
from agent.protocol.messages import EventMessage, Status, TelemetryMessage, dumps
from agent.protocol.state import Health, ModelInfo, ReportedState, Slots, UpdateSnapshot
from agent.protocol.topics import DeviceTopics, command_subscriptions
from agent.protocol.transfer import Need, TransferError, decode_chunk, ranges_of
from agent.protocol.update import (
    BadVersion,
    CancelAccepted,
    DeployRequest,
    HttpSource,
    JobAccepted,
    ModelRef,
    MqttSource,
    Phase,
    RollbackRequest,
    TrialSpec,
    UpdateStatus,
)
from agent.update.errors import UpdateCode, UpdateError
from agent.version import compare_versions
from fleet.simulate.commands import Args, CommandError, Incoming, SignatureCache, SimDispatcher
from fleet.simulate.loop import Reactor, Timer

log = logging.getLogger(__name__)

# What the real agent answers (agent/link/handlers.py); `infer` answers a fixed
# two-class KServe v2 response so a console's `infer` can be tried on a simulator.
COMMANDS = ("ping", "status", "config.get", "config.set", "infer", "logs", "deploy",
            "rollback", "update.status", "update.cancel")  # fmt: skip
DEPLOY_ARGS = ("url", "transfer", "sha256", "size", "version", "name", "mode", "shadow", "trial",
               "allow_downgrade", "force")  # fmt: skip
# The agent's run-time tunables (agent/link/tunables.py) with its defaults, and bounds.
TUNABLE_DEFAULTS: dict[str, Any] = {
    "telemetry.interval_s": 10.0, "log_level": "info",
    "runtimes.onnxruntime.intra_op_threads": 0, "runtimes.litert.threads": 1,
    "memory.soft_limit_mb": 0, "batching.enabled": False, "batching.max_batch": 32,
    "batching.max_wait_ms": 2.0,
}  # fmt: skip
TUNABLE_BOUNDS: dict[str, tuple[type, float, float]] = {
    "telemetry.interval_s": (float, 0.05, 86_400.0),
    "runtimes.onnxruntime.intra_op_threads": (int, 0, 256),
    "runtimes.litert.threads": (int, 1, 256),
    "memory.soft_limit_mb": (float, 0, 1 << 20),
    "batching.max_batch": (int, 1, 4096),
    "batching.max_wait_ms": (float, 0, 1000),
}
LOG_LEVELS = ("debug", "info", "warning", "error")
P95_FLOOR_MS = 2.0  # the agent's trial: a previous p95 counts as 2 ms at least
PRE_SWAP = (Phase.DOWNLOADING, Phase.VERIFYING, Phase.VALIDATING, Phase.SHADOW)
# Where `crash_rate` kills a device: the phases the agent's recovery ends with
# update.interrupted (a download is resumed instead, so it is not one of them).
CRASH_PHASES = (Phase.VERIFYING, Phase.VALIDATING, Phase.TRIAL)
DEFAULT_LATENCY = {p.value: 0.05 for p in Phase}
LIVE_WINDOW_S = 300.0  # the watchdog's recent window (5-10 minutes on the agent)
MAX_QUEUED = 1000  # events kept while offline (the agent's outbox, much smaller)
CHUNK_TIMEOUT_S = 1.0  # update.chunk_timeout_s (the agent's default is 5 s)
TRANSFER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Signal:
    """How one model version behaves on a device, relative to that device's baseline."""

    p95_factor: float = 1.0
    error_rate: float = 0.0
    agreement: float = 1.0  # shadow top-1 agreement with the served model
    nonfinite_rate: float = 0.0


@dataclass
class Knobs:
    """What can go wrong, per device; rates are decided once per (device, version) from
    the seed, so the same run gives the same outcome."""

    fail_rate: float = 0.0  # validation fails: update.validation_failed
    crash_rate: float = 0.0  # dies mid-update, back after crash_downtime_s: update.interrupted
    hang_rate: float = 0.0  # stays in `hang_phase` forever (until update.cancel)
    hang_phase: str = Phase.DOWNLOADING.value
    crash_downtime_s: float = 0.5
    crash_phase: str | None = None  # where crashes happen; None: one of CRASH_PHASES (seeded)
    latency: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LATENCY))
    trial_s: float | None = None  # trial length; None: the deploy's trial.window_s (or latency)
    skip_download: bool = False  # no real download (benchmarks at 10,000 devices)
    # `model.live` of a model just swapped in counts only what it answered since (the
    # watchdog's truth: a gate must wait for traffic); off: a full window at once, so
    # tests with sub-second soaks get figures.
    live_since_swap: bool = False


class Port(Protocol):
    """The device's side of its MQTT connection (owned by the simulator)."""

    reactor: Reactor
    connected: bool

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None: ...

    def reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None: ...

    def subscribe(self, topic: str, device: SimDevice) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def drop(self, device: SimDevice, reason: str) -> None:
        """The device is gone: its own connection dies (the broker sends its last will),
        or, multiplexed, an explicit retained offline status says so."""
        ...

    def restore(self, device: SimDevice) -> None: ...


@dataclass
class Shared:
    """What all devices of one simulator share."""

    signatures: SignatureCache | None
    downloads: Executor
    seed: int
    telemetry_interval_s: float
    model_name: str
    model_version: str
    profile: Callable[[str, str], Signal]  # (device_id, version) -> its signal
    sent: dict[str, int] = field(default_factory=dict)  # messages published, by stream
    rng: random.Random = field(default_factory=random.Random)  # noise in the figures only


@dataclass
class _Model:
    name: str
    version: str
    sha256: str

    @property
    def variant(self) -> str:
        """A simulated device "measures" two variants; which wins follows from the
        bundle, so a fleet shows both, and the same bundle always picks the same one."""
        return "int8" if sum(map(ord, self.sha256)) % 2 else "fp32"

    @property
    def variant_reason(self) -> str:
        return f"simulated: {self.variant} was the faster of 2 that passed"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "runtime": "simulated", "variant": self.variant,
                "variant_reason": self.variant_reason}  # fmt: skip

    def info(self, runtime: bool = False) -> ModelInfo:
        if not runtime:
            return ModelInfo(self.name, self.version, self.sha256)
        return ModelInfo(self.name, self.version, self.sha256, "simulated", self.variant,
                         self.variant_reason)  # fmt: skip


@dataclass
class _Job:
    id: str
    kind: str
    version: str
    request: DeployRequest | None
    args: dict[str, Any]
    previous: _Model | None
    started: float
    phase: Phase = Phase.ACCEPTED
    phase_started: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    code: str | None = None
    reason: str | None = None
    finished: float | None = None
    timer: Timer | None = None
    cancel: bool = False
    transfer: _Transfer | None = None
    candidate: _Model | None = None
    entered: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "phase": self.phase.value, "request": self.args,
            "version": self.version, "started": self.started, "phase_started": self.phase_started,
            "candidate_sha": None if self.candidate is None else self.candidate.sha256,
            "candidate_dir": None,
            "previous_version": None if self.previous is None else self.previous.version,
            "previous_sha": None if self.previous is None else self.previous.sha256,
            "mode": self.figures.get("mode"), "figures": self.figures, "code": self.code,
            "reason": self.reason, "finished": self.finished,
        }  # fmt: skip


@dataclass
class _Transfer:
    """An MQTT chunk transfer in memory (the agent keeps a file and a bitmap)."""

    tid: str
    size: int
    sha256: str
    data: bytearray | None = None
    have: set[int] = field(default_factory=set)
    total: int | None = None
    chunk_size: int = 0
    dropped: int = 0
    round_last: int | None = None
    last_news: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    timer: Timer | None = None


def _fraction(seed: int, *parts: object) -> float:
    """A number in [0, 1) fixed by the seed and `parts` (device, version, what)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def model_sha(name: str, version: str) -> str:
    return hashlib.sha256(f"simulated {name} {version}".encode()).hexdigest()


class SimDevice:
    def __init__(
        self, device_id: str, groups: tuple[str, ...], shared: Shared, knobs: Knobs
    ) -> None:
        self.id = device_id
        self.groups = groups
        self.shared = shared
        self.knobs = knobs
        self.topics = DeviceTopics(device_id)
        # Plays an agent of the earlier release: dotted command topics only, no `topics`
        # in its status (set before the simulator starts: subscriptions are made at connect).
        self.old_agent = False
        # Noise in the figures comes from one generator for all devices (a Random each
        # would be 2.5 KB a device); what decides outcomes is fixed by the seed.
        self.rng = shared.rng

        def draw(low: float, high: float, what: str) -> float:
            return low + (high - low) * _fraction(shared.seed, device_id, what)

        # Each device's own baseline, so a gate has to be relative to it.
        self.baseline_p95_ms = round(draw(2.0, 20.0, "p95"), 3)
        self.rate_per_s = round(draw(5.0, 50.0, "rate"), 2)
        self.rss_mb = round(draw(60.0, 140.0, "rss"), 1)
        self.temperature_c = round(draw(38.0, 70.0, "temperature"), 1)
        self.started = time.time()
        name, version = shared.model_name, shared.model_version
        self.model: _Model | None = _Model(name, version, model_sha(name, version))
        self.previous: _Model | None = None
        self.generation = 1
        self.served_since = time.monotonic() - LIVE_WINDOW_S  # served long before we started
        self.bad: dict[str, tuple[str, float]] = {}  # version -> (why, when) marked bad
        self.job: _Job | None = None
        self.shadow: dict[str, Any] = {}
        self.tunable = {**TUNABLE_DEFAULTS, "telemetry.interval_s": shared.telemetry_interval_s}
        self.event_seq = 0
        self.telemetry_seq = 0
        self.totals = {"requests": 0, "errors": 0}
        self.online = True  # what the device wants: offline() / a crash clear it
        self.crashed = False
        self.port: Port | None = None
        self.queued: deque[tuple[str, bytes]] = deque(maxlen=MAX_QUEUED)
        self.logs: deque[str] = deque(maxlen=200)
        self._telemetry_timer: Timer | None = None
        self._state_sent: bytes | None = None
        self._refusal_at: dict[str, float] = {}
        self.dispatcher = SimDispatcher(
            device_id, groups, COMMANDS, self._run_command, shared.signatures, self._refused
        )

    # ----------------------------------------------------------------- wiring

    @property
    def reactor(self) -> Reactor:
        assert self.port is not None
        return self.port.reactor

    def filters(self) -> list[str]:
        # The portable spelling only, as an agent on NATS ends up with; an old agent
        # took the dotted one only.
        subscriptions = command_subscriptions(
            self.id, self.groups, COMMANDS, legacy=False, portable=not self.old_agent
        )
        return [str(f) for f in subscriptions]

    def will(self) -> bytes:
        return self._status("offline", "connection lost (last will)")

    def _status(self, state: str, reason: str) -> bytes:
        body = Status(self.id, state, __version__, time.time(), reason).to_json()
        if self.old_agent:
            del body["topics"]  # the earlier release did not advertise its spellings
        return dumps(body)

    def _send(self, stream: str, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.port is not None
        self.port.publish(topic, payload, retain)
        self.shared.sent[stream] = self.shared.sent.get(stream, 0) + 1

    def announce(self) -> None:
        """The connection is up and subscribed: online, state, what waited; telemetry."""
        if not self.online:
            return
        self._send("status", str(self.topics.status), self._status("online", "connected"), True)
        self.publish_state(force=True)
        while self.queued:
            topic, payload = self.queued.popleft()
            self._send("events", topic, payload)
        self._schedule_telemetry(first=True)

    def offline_status(self, reason: str) -> bytes:
        return self._status("offline", reason)

    def stop_telemetry(self) -> None:
        if self._telemetry_timer is not None:
            self._telemetry_timer.cancel()
            self._telemetry_timer = None

    # ----------------------------------------------------------------- state and streams

    def state(self) -> dict[str, Any]:
        """The retained state, built through the typed `ReportedState` as the agent's."""
        model = self.model
        tunable = dict(self.tunable)
        job = self.job
        update = None
        if job is not None:
            served = None if model is None or not job.phase.final else model.info()
            update = UpdateSnapshot(
                job.id, job.kind, job.phase.value, job.version, job.code, served
            )
        return ReportedState(
            device_id=self.id,
            agent_version=__version__,
            model=None if model is None else model.info(runtime=True),
            slots=Slots(
                None if model is None else model.sha256,
                None if self.previous is None else self.previous.sha256,
            ),
            last_known_good=None if self.previous is None else self.previous.info(),
            groups=self.groups,
            config_digest=hashlib.sha256(dumps(tunable)).hexdigest(),
            tunable=tunable,
            health=Health(ready=model is not None, overloaded=False),
            update=update,
        ).to_json()

    def publish_state(self, force: bool = False) -> None:
        body = dumps(self.state())
        if not force and body == self._state_sent:
            return
        if self.port is None or not self.port.connected or not self.online:
            self._state_sent = None
            return
        self._send("state", str(self.topics.state), body, True)
        self._state_sent = body

    def emit(self, kind: EventKind, reason: str, **data: Any) -> None:
        self.event_seq += 1
        message = EventMessage(self.id, self.event_seq, time.time(), kind, reason, data)
        payload = dumps(message.to_json())
        self.logs.append(f"INFO event {kind}: {reason}")
        if self.online and self.port is not None and self.port.connected:
            self._send("events", str(self.topics.events), payload)
        elif not self.crashed:
            self.queued.append((str(self.topics.events), payload))  # the outbox keeps it
        if kind.republishes_state:
            self.publish_state()

    def _refused(self, code: str, message: str, data: dict[str, Any]) -> None:
        now = time.monotonic()  # at most one refusal event per code a second, as the agent
        if now - self._refusal_at.get(code, -1e18) < 1.0:
            return
        self._refusal_at[code] = now
        self.emit(EventKind.COMMAND_REFUSED, message, code=code, suppressed=0, **data)

    def signal(self, version: str | None = None) -> Signal:
        v = version or (self.model.version if self.model else "")
        return self.shared.profile(self.id, v)

    def live(self) -> dict[str, Any]:
        """`model.live` as the agent's watchdog reports it, from this version's signal,
        over a 5-minute window of the served generation (with `live_since_swap`, only
        the part since it was swapped in)."""
        sig = self.signal()
        served_s = LIVE_WINDOW_S
        if self.knobs.live_since_swap:
            served_s = min(LIVE_WINDOW_S, time.monotonic() - self.served_since)
        n = max(0, round(self.rate_per_s * served_s))
        errors = round(n * sig.error_rate)
        nonfinite = round(n * sig.nonfinite_rate)
        p95 = self.baseline_p95_ms * sig.p95_factor * self.rng.uniform(0.99, 1.01)
        return {
            # Rates as the version's signal says (not errors / n): a gate on a model
            # swapped in a second ago must see the same rate as one an hour later.
            "requests": float(n), "errors": float(errors),
            "error_rate": sig.error_rate if n else 0.0, "nonfinite": float(nonfinite),
            "nonfinite_rate": sig.nonfinite_rate if n else 0.0,
            "latency_samples": float(n), "p50_ms": round(p95 * 0.55, 4),
            "p95_ms": round(p95, 4), "generation": float(self.generation),
            "rss_at_start_mb": self.rss_mb,
        }  # fmt: skip

    def telemetry(self) -> bytes:
        sig = self.signal()
        interval = self.interval_s
        requests = max(0, round(self.rate_per_s * interval * self.rng.uniform(0.9, 1.1)))
        errors = round(requests * sig.error_rate)
        self.totals["requests"] += requests
        self.totals["errors"] += errors
        p95 = self.baseline_p95_ms * sig.p95_factor * self.rng.uniform(0.97, 1.03)
        model: dict[str, Any] | None = None
        if self.model is not None:
            model = {**self.model.summary(), "live": self.live()}
            if self.shadow:
                model["shadow"] = dict(self.shadow)
        inference = {
            "interval": {"requests": requests, "errors": errors,
                         "rate_per_s": round(requests / interval, 3), "seconds": interval,
                         "p50_ms": round(p95 * 0.55, 4), "p95_ms": round(p95, 4),
                         "p99_ms": round(p95 * 1.3, 4), "mean_batch": 1.0, "max_batch": 1},
            "total": {"requests": self.totals["requests"], "items": self.totals["requests"],
                      "errors": self.totals["errors"], "p50_ms": round(p95 * 0.55, 4),
                      "p95_ms": round(p95, 4), "p99_ms": round(p95 * 1.3, 4)},
        }  # fmt: skip
        system = {
            "cpu_percent": round(self.rng.uniform(5, 60), 1),
            "process_cpu_percent": round(self.rng.uniform(1, 20), 1),
            "rss_mb": round(self.rss_mb + self.rng.uniform(-1, 1), 1),
            "available_mb": 900.0, "load": [0.1, 0.2, 0.3],
            "temperatures_c": {"cpu-thermal": round(self.temperature_c + self.rng.uniform(-1, 1), 1)},
            "disk_free_mb": 5000.0, "uptime_s": round(time.time() - self.started, 1),
        }  # fmt: skip
        outbox = {"messages": len(self.queued), "bytes": sum(len(p) for _, p in self.queued),
                  "oldest_age_s": None, "dropped": {"telemetry": 0, "event": 0},
                  "write_errors": 0}  # fmt: skip
        self.telemetry_seq += 1
        message = TelemetryMessage(
            self.id, self.telemetry_seq, time.time(), interval, inference, system, model, outbox
        )
        return dumps(message.to_json())

    def _schedule_telemetry(self, first: bool = False) -> None:
        self.stop_telemetry()
        # Spread over the interval: a thousand devices must not report in the same tick.
        delay = self.rng.uniform(0, self.interval_s) if first else self.interval_s
        self._telemetry_timer = self.reactor.call_later(delay, self._report)

    def _report(self) -> None:
        self._telemetry_timer = None
        if not self.online or self.port is None or not self.port.connected:
            return
        # Retained, as the agent's: a console opened later sees the newest report.
        self._send("telemetry", str(self.topics.telemetry), self.telemetry(), True)
        self._schedule_telemetry()

    # ----------------------------------------------------------------- commands

    def on_command(self, msg: Incoming) -> None:
        if not self.online:
            return  # a device that is down hears nothing
        out = self.dispatcher.handle(msg)
        if out is not None and self.port is not None:
            self.port.reply(out.topic, out.payload, out.correlation_data)
            self.shared.sent["replies"] = self.shared.sent.get("replies", 0) + 1

    def _run_command(self, name: str, raw: dict[str, Any]) -> Any:
        if name == "ping":
            Args(name, raw, ())
            return {"pong": True, "device_id": self.id, "agent_version": __version__,
                    "time": time.time()}  # fmt: skip
        if name == "status":
            Args(name, raw, ())
            return {"device_id": self.id, "agent_version": __version__,
                    "uptime_s": round(time.time() - self.started, 3),
                    "ready": self.model is not None,
                    "model": None if self.model is None else self.model.summary(),
                    "memory": {"rss_mb": self.rss_mb, "overloaded": False},
                    "link": {"connected": True, "simulated": True}}  # fmt: skip
        if name == "config.get":
            keys = Args(name, raw, ("keys",)).strings("keys")
            tunable = dict(self.tunable)
            config = {"device_id": self.id, "mqtt": {"groups": list(self.groups)}, **tunable}
            if keys is None:
                return {"tunable": tunable, "config": config}
            flat = {**tunable, "device_id": self.id, "mqtt.groups": list(self.groups)}
            for key in keys:
                if key not in flat:
                    raise CommandError(
                        "command.bad_args",
                        f"config.get: {key[:64]!r} is not a readable setting "
                        "(see config.get without keys, or docs/mqtt.md)",
                    )
            return {"values": {k: flat[k] for k in keys}}
        if name == "config.set":
            return self._config_set(Args(name, raw, ("values",)).mapping("values"))
        if name == "infer":
            return self._infer(Args(name, raw, ("model", "inputs", "outputs")))
        if name == "logs":
            a = Args(name, raw, ("lines", "level"))
            lines = a.integer("lines", 100, 1, 500)
            a.choice("level", "debug", LOG_LEVELS)
            return {"lines": list(self.logs)[-lines:]}
        if name == "deploy":
            Args(name, raw, DEPLOY_ARGS)
            return self._deploy(raw)
        if name == "rollback":
            Args(name, raw, ("version",))
            return self._rollback(raw)
        if name == "update.status":
            Args(name, raw, ())
            return self._update_status()
        if name == "update.cancel":
            Args(name, raw, ())
            return self._cancel()
        raise CommandError("command.unknown", f"unknown command {name!r}")

    @property
    def interval_s(self) -> float:
        return float(self.tunable["telemetry.interval_s"])

    def _config_set(self, values: dict[str, Any]) -> dict[str, Any]:
        """All or nothing, with the agent's codes (config.not_tunable, config.invalid)."""
        if not values:
            raise CommandError("command.bad_args", "nothing to set: pass {key: value}")
        applied: dict[str, Any] = {}
        for key, value in values.items():
            if key not in TUNABLE_DEFAULTS:
                raise CommandError(
                    "config.not_tunable",
                    f"config.set: {key[:64]!r} cannot be changed at run time "
                    f"(tunable: {', '.join(TUNABLE_DEFAULTS)}); change agent.toml and restart",
                )
            applied[key] = _tunable(key, value)
        interval = self.interval_s
        self.tunable.update(applied)
        if self.interval_s != interval and self.online and self.port is not None:
            self._schedule_telemetry()
        self.publish_state()
        return {"applied": applied}

    def _infer(self, a: Args) -> dict[str, Any]:
        inputs = a.values.get("inputs")
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, dict) and isinstance(i.get("data"), list) for i in inputs)
        ):
            raise CommandError(
                "request.malformed", 'infer: "inputs" must be a list of KServe v2 tensors'
            )
        if self.model is None:
            raise CommandError("model.not_ready", "no model is served")
        name = a.values.get("model")
        if name is not None and name != self.model.name:
            raise CommandError("model.not_found", f"no model {str(name)[:64]!r} is served here")
        # A fixed answer from the input: the same input gives the same output.
        seed = _fraction(self.shared.seed, dumps(inputs).decode())
        data = [round(seed, 6), round(1 - seed, 6)]
        return {"model_name": self.model.name, "model_version": self.model.version,
                "outputs": [{"name": "scores", "datatype": "FP32", "shape": [1, 2],
                             "data": data}]}  # fmt: skip

    # ----------------------------------------------------------------- update jobs

    def _busy(self) -> None:
        job = self.job
        if job is not None and not job.phase.final:
            raise CommandError(
                UpdateCode.BUSY,
                f"job {job.id} is running ({job.phase.value}); wait for its end or update.cancel",
            )

    def _deploy(self, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            request = DeployRequest.from_args(raw)
        except UpdateError as exc:
            raise CommandError(exc.code, exc.message) from None
        if (request.allow_downgrade or request.force) and self.shared.signatures is None:
            raise CommandError(
                UpdateCode.BAD_ARGS,
                'deploy with "allow_downgrade" or "force" needs signed commands, and this '
                "device accepts unsigned ones (commands.require_signature = false)",
            )
        self._busy()
        if request.version in self.bad and not request.force:
            raise CommandError(
                UpdateCode.MARKED_BAD,
                f"version {request.version} was rolled back on this device "
                f'({self.bad[request.version][0]}); deploy it with "force": true to try it again',
            )
        served = self.model
        if (
            served is not None
            and not request.allow_downgrade
            and compare_versions(request.version, served.version) <= 0
        ):
            raise CommandError(
                UpdateCode.NOT_NEWER,
                f"version {request.version} is not newer than the served {served.version}; "
                'deploy with "allow_downgrade": true (signed) or send rollback',
            )
        if request.shadow is not None and request.mode == "cold":
            raise CommandError(
                UpdateCode.BAD_ARGS,
                'deploy: "shadow" needs both models resident; it cannot go with mode "cold"',
            )
        name = request.name or (served.name if served else self.shared.model_name)
        job = self._new_job("deploy", request.version, request, request.to_args())
        job.candidate = _Model(name, request.version, request.sha256)
        self._start(job, Phase.DOWNLOADING)
        return JobAccepted(job.id).to_json()

    def _rollback(self, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            request = RollbackRequest.from_args(raw)
        except UpdateError as exc:
            raise CommandError(exc.code, exc.message) from None
        if self.shared.signatures is None:
            raise CommandError(
                UpdateCode.BAD_ARGS,
                "rollback needs signed commands, and this device accepts unsigned ones "
                "(commands.require_signature = false)",
            )
        self._busy()
        on_disk = [m for m in (self.previous,) if m is not None]
        target = on_disk[0] if on_disk and request.version is None else None
        if request.version is not None:
            target = next((m for m in on_disk if m.version == request.version), None)
        if target is None:
            have = ", ".join(m.version for m in on_disk) or "none"
            raise CommandError(
                UpdateCode.NO_SUCH_VERSION,
                f"no bundle of {request.version or 'a previous version'} on this device "
                f"(on disk besides the served one: {have})",
            )
        job = self._new_job("rollback", target.version, None, {"version": request.version})
        job.candidate = target
        self._start(job, Phase.VALIDATING)
        return JobAccepted(job.id, target.version).to_json()

    def _update_status(self) -> dict[str, Any]:
        job = self.job
        return UpdateStatus(
            job=None,
            running=job is not None and not job.phase.final,
            served=None if self.model is None else ModelRef(self.model.version, self.model.sha256),
            previous=None
            if self.previous is None
            else ModelRef(self.previous.version, self.previous.sha256),
            bad_versions=tuple(
                BadVersion(v, "", why, ts) for v, (why, ts) in sorted(self.bad.items())
            ),
            job_json=None if job is None else job.record(),
        ).to_json()

    def _cancel(self) -> dict[str, Any]:
        job = self.job
        if job is None or job.phase.final:
            raise CommandError(UpdateCode.NOTHING_TO_CANCEL, "no update job is running")
        if job.phase is Phase.SWAPPING:
            raise CommandError(
                UpdateCode.BUSY,
                f"job {job.id} is swapping models; cancel again once it is in trial "
                "(that rolls back), or send rollback after it ends",
            )
        phase = job.phase
        job.cancel = True
        # Handled on the next turn, after this reply went out (as the agent's job thread).
        self.reactor.call_later(0, lambda: self._cancel_now(job))
        return CancelAccepted(job.id, phase.value).to_json()

    def _cancel_now(self, job: _Job) -> None:
        if job is not self.job or job.phase.final:
            return
        self._stop_work(job)
        if job.phase is Phase.TRIAL:
            self._swap_back(job)
            self._finish(job, Phase.ROLLED_BACK, UpdateCode.CANCELLED, "cancelled (update.cancel)")
        elif job.phase is not Phase.SWAPPING:
            self._finish(job, Phase.CANCELLED, UpdateCode.CANCELLED, "cancelled (update.cancel)")

    def _new_job(
        self, kind: str, version: str, request: DeployRequest | None, args: dict[str, Any]
    ) -> _Job:
        now = time.time()
        return _Job(uuid.uuid4().hex[:16], kind, version, request, args, self.model, now,
                    phase_started=now)  # fmt: skip

    def _start(self, job: _Job, first: Phase) -> None:
        self.job = job
        self.emit(EventKind.UPDATE_ACCEPTED, f"{job.kind} {job.version}: accepted as job {job.id}",
                  job=job.id, version=job.version)  # fmt: skip
        job.timer = self.reactor.call_later(0, lambda: self._enter(job, first))

    def _decide(self, job: _Job, what: str, rate: float) -> bool:
        return rate > 0 and _fraction(self.shared.seed, self.id, job.version, what) < rate

    def _latency(self, phase: Phase) -> float:
        return float(self.knobs.latency.get(phase.value, 0.05))

    def _enter(self, job: _Job, phase: Phase, reason: str = "", **figures: Any) -> None:
        if job is not self.job or job.phase.final or self.crashed:
            return
        if job.cancel and phase in PRE_SWAP:
            self._finish(job, Phase.CANCELLED, UpdateCode.CANCELLED, "cancelled (update.cancel)")
            return
        job.figures.update(figures)
        job.phase = phase
        job.phase_started = time.time()
        job.entered = time.monotonic()
        self.emit(phase.event, reason or f"{phase.value} {job.version}", job=job.id,
                  version=job.version, **job.figures)  # fmt: skip
        knobs = self.knobs
        if job.kind == "deploy" and phase in CRASH_PHASES:
            crash_at = CRASH_PHASES[
                int(_fraction(self.shared.seed, self.id, job.version, "where") * len(CRASH_PHASES))
            ]
            if knobs.crash_phase is not None:
                crash_at = Phase(knobs.crash_phase)
            if phase is crash_at and self._decide(job, "crash", knobs.crash_rate):
                job.timer = self.reactor.call_later(
                    self._latency(phase) / 2, lambda: self._crash(job)
                )
                return
        if phase.value == knobs.hang_phase and self._decide(job, "hang", knobs.hang_rate):
            log.info("%s: job %s hangs in %s (hang_rate)", self.id, job.id, phase.value)
            return  # forever: only update.cancel (before the swap) ends it
        step = getattr(self, f"_phase_{phase.value}")
        step(job)

    def _after(self, job: _Job, delay: float, fn: Callable[[], None]) -> None:
        job.timer = self.reactor.call_later(delay, fn)

    def _phase_downloading(self, job: _Job) -> None:
        request = job.request
        assert request is not None
        if self.knobs.skip_download:
            self._after(job, self._latency(Phase.DOWNLOADING), lambda: self._downloaded(job, 0.0))
        elif isinstance(request.source, HttpSource):
            url = request.source.url
            future = self.shared.downloads.submit(_download, url, request.size, request.sha256)
            reactor = self.reactor

            def done(f: Any) -> None:
                reactor.call_soon(lambda: self._http_done(job, f))

            future.add_done_callback(done)
        else:
            assert isinstance(request.source, MqttSource)
            self._start_transfer(job, request)

    def _http_done(self, job: _Job, future: Any) -> None:
        if job is not self.job or job.phase is not Phase.DOWNLOADING or self.crashed:
            return
        try:
            seconds = future.result()
        except UpdateError as exc:
            self._finish(job, Phase.FAILED, exc.code, exc.message, dict(exc.data))
            return
        except Exception as exc:  # reported as the agent would
            self._finish(job, Phase.FAILED, UpdateCode.DOWNLOAD_FAILED, f"download failed: {exc}")
            return
        self._downloaded(job, seconds)

    def _downloaded(self, job: _Job, seconds: float) -> None:
        if job is not self.job or job.phase is not Phase.DOWNLOADING:
            return
        request = job.request
        assert request is not None
        seconds = max(seconds, time.monotonic() - job.entered)
        kbps = round(request.size * 8 / 1000 / max(seconds, 1e-6), 1)
        self.emit(Phase.DOWNLOADING.event, "download progress", job=job.id, version=job.version,
                  bytes=request.size, total=request.size, percent=100,
                  seconds=round(seconds, 3), kbps=kbps)  # fmt: skip
        self._after(job, 0, lambda: self._enter(
            job, Phase.VERIFYING, f"verifying {job.version}",
            download_s=round(seconds, 3), kbps=kbps))  # fmt: skip

    def _phase_verifying(self, job: _Job) -> None:
        latency = self._latency(Phase.VERIFYING)
        self._after(job, latency, lambda: self._enter(
            job, Phase.VALIDATING, f"validating {job.version} on this device",
            verify_s=round(latency, 3)))  # fmt: skip

    def _phase_validating(self, job: _Job) -> None:
        def done() -> None:
            budget = round(self.baseline_p95_ms * 3 + 1, 3)
            if job.kind == "deploy" and self._decide(job, "fail", self.knobs.fail_rate):
                p50 = round(budget * 1.5, 3)
                self._finish(
                    job, Phase.FAILED, UpdateCode.VALIDATION_FAILED,
                    f"latency: median {p50} ms over the budget {budget} ms",
                    {"check": "latency", "latency_p50_ms": p50, "latency_budget_ms": budget},
                )  # fmt: skip
                return
            figures = {"mode": "hot", "golden_max_diff": 0.0, "measured_mb": 4.0,
                       "latency_p50_ms": round(self.baseline_p95_ms * 0.5, 3),
                       "latency_budget_ms": budget}  # fmt: skip
            request = job.request
            if request is not None and request.shadow is not None:
                self._enter(job, Phase.SHADOW, f"{job.version} in shadow beside the served model")
            else:
                self._enter(job, Phase.SWAPPING, f"swapping to {job.version} (hot)", **figures)

        self._after(job, self._latency(Phase.VALIDATING), done)

    def _phase_shadow(self, job: _Job) -> None:
        request = job.request
        assert request is not None and request.shadow is not None
        spec = request.shadow

        def done() -> None:
            sig = self.signal(job.version)
            served_p95 = self.baseline_p95_ms * self.signal().p95_factor
            compared = max(spec.min_requests, 50)
            self.shadow = {
                "agreement": round(sig.agreement, 4), "compared": float(compared),
                "offered": float(compared * 5), "sampled": float(compared), "dropped": 0.0,
                "candidate_errors": 0.0, "duty": round(spec.duty_cycle / 2, 4),
                "sample": spec.sample, "duty_cycle": spec.duty_cycle,
                "candidate_p95_ms": round(self.baseline_p95_ms * sig.p95_factor, 4),
                "served_p95_ms": round(served_p95, 4),
            }  # fmt: skip
            figures = {f"shadow_{k}": v for k, v in self.shadow.items()}
            if sig.agreement < spec.min_agreement:
                self._finish(
                    job, Phase.FAILED, UpdateCode.SHADOW_DISAGREED,
                    f"shadow: agreement {sig.agreement:.4f} under {spec.min_agreement:g}",
                    figures,
                )  # fmt: skip
                return
            self._enter(job, Phase.SWAPPING, f"swapping to {job.version} (hot)", mode="hot",
                        **figures)  # fmt: skip

        self._after(job, self._latency(Phase.SHADOW), done)

    def _phase_swapping(self, job: _Job) -> None:
        latency = self._latency(Phase.SWAPPING)

        def done() -> None:
            candidate = job.candidate
            assert candidate is not None
            old = self.model
            self.model = candidate
            self.previous = old
            self.generation += 1
            self.served_since = time.monotonic()
            job.figures["swap_s"] = round(latency, 3)
            self.emit(EventKind.MODEL_SWAPPED, f"serving {candidate.name} {candidate.version}",
                      previous=None if old is None else old.version,
                      **candidate.summary())  # fmt: skip
            if job.kind == "rollback":
                self._finish(job, Phase.ROLLED_BACK, None,
                             f"rolled back to {candidate.version} (rollback requested)",
                             {"model": candidate.summary()})  # fmt: skip
                return
            self._enter(job, Phase.TRIAL, f"{job.version} serving; trial")

        self._after(job, latency, done)

    def _trial_spec(self, job: _Job) -> tuple[TrialSpec, float]:
        request = job.request
        spec = request.trial if request is not None and request.trial is not None else None
        if self.knobs.trial_s is not None:
            window = self.knobs.trial_s
        elif spec is not None:
            window = spec.window_s
        else:
            window = self._latency(Phase.TRIAL)
        return (spec or TrialSpec()), window

    def _phase_trial(self, job: _Job) -> None:
        spec, window = self._trial_spec(job)

        def done() -> None:
            old = job.previous
            live = {**self.live(), "error_rate": self.signal().error_rate,
                    "nonfinite_rate": self.signal().nonfinite_rate}  # fmt: skip
            figures = {f"trial_{k}": v for k, v in live.items()}
            breach = None
            if old is not None:
                base = self.baseline_p95_ms * self.signal(old.version).p95_factor
                ratio = round(live["p95_ms"] / max(base, P95_FLOOR_MS), 3)
                figures.update(trial_baseline_p95_ms=round(base, 4), trial_p95_ratio=ratio)
                if ratio > spec.max_p95_ratio:
                    breach = f"p95_ratio: {ratio} over {spec.max_p95_ratio:g}"
            if breach is None and live["error_rate"] > spec.max_error_rate:
                breach = f"error_rate: {live['error_rate']:.4f} over {spec.max_error_rate:g}"
            if breach is None and live["nonfinite_rate"] > spec.max_nonfinite_rate:
                breach = (
                    f"nonfinite_rate: {live['nonfinite_rate']:.4f} over {spec.max_nonfinite_rate:g}"
                )
            job.figures.update(figures)
            if breach is not None:
                self._swap_back(job)
                self.bad[job.version] = (breach, time.time())
                self._finish(
                    job, Phase.ROLLED_BACK, UpdateCode.TRIAL_FAILED,
                    f"trial: {breach}; rolled back to {old.version if old else 'nothing'} "
                    f"and marked {job.version} bad", {"rollback_s": 0.0},
                )  # fmt: skip
                return
            self._finish(
                job,
                Phase.COMMITTED,
                None,
                f"committed {job.version}",
                {"model": None if self.model is None else self.model.summary()},
            )

        self._after(job, window, done)

    def _swap_back(self, job: _Job) -> None:
        old = job.previous
        if old is None or self.model is old:
            return
        rejected = self.model
        self.model = old
        self.previous = rejected
        self.generation += 1
        self.served_since = time.monotonic()
        self.emit(EventKind.MODEL_ROLLED_BACK, f"serving {old.name} {old.version} again",
                  rejected=None if rejected is None else rejected.version)  # fmt: skip

    def _finish(
        self,
        job: _Job,
        phase: Phase,
        code: str | None,
        reason: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._stop_work(job)
        job.figures.update(data or {})
        job.phase, job.code, job.reason = phase, code, reason
        job.finished = job.phase_started = time.time()
        self.emit(phase.event, reason, job=job.id, version=job.version, code=code, **job.figures)

    def _stop_work(self, job: _Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        transfer = job.transfer
        if transfer is not None:
            if transfer.timer is not None:
                transfer.timer.cancel()
            if self.port is not None:
                self.port.unsubscribe(str(self.topics.bundle(transfer.tid)))
            job.transfer = None

    # ----------------------------------------------------------------- crashes, offline

    def _crash(self, job: _Job) -> None:
        if job is not self.job or job.phase.final:
            return
        log.info("%s: crashes in %s (crash_rate)", self.id, job.phase.value)
        self._stop_work(job)
        self.crashed = True
        self.take_offline("connection lost (simulated crash)")

        def back() -> None:
            # What the agent's recovery does at the next start (agent/update/recovery.py).
            self.crashed = False
            self.bring_online()
            if job.phase is Phase.TRIAL:
                self._swap_back(job)
                old = job.previous
                self._finish(
                    job, Phase.ROLLED_BACK, UpdateCode.INTERRUPTED,
                    f"the agent stopped during trial of {job.version} (crash 1 of this "
                    f"version); rolled back to {old.version if old else 'nothing'}",
                )  # fmt: skip
                return
            self._finish(
                job, Phase.FAILED, UpdateCode.INTERRUPTED,
                f"the agent stopped during {job.phase.value}; candidate {job.version} "
                "discarded, the served model is unchanged",
            )  # fmt: skip

        self.reactor.call_later(self.knobs.crash_downtime_s, back)

    def take_offline(self, reason: str = "connection lost (simulated)") -> None:
        if not self.online:
            return
        self.stop_telemetry()
        assert self.port is not None
        self.online = False
        self.port.drop(self, reason)

    def bring_online(self) -> None:
        if self.online:
            return
        self.online = True
        assert self.port is not None
        self.port.restore(self)

    # ----------------------------------------------------------------- MQTT transfers

    def _start_transfer(self, job: _Job, request: DeployRequest) -> None:
        assert isinstance(request.source, MqttSource)
        assert self.port is not None
        t = _Transfer(request.source.transfer_id, request.size, request.sha256)
        job.transfer = t
        self.port.subscribe(str(self.topics.bundle(t.tid)), self)
        self._ask(t, "start")
        self._watch_transfer(job)

    def _ask(self, t: _Transfer, reason: str) -> None:
        missing = [] if t.total is None else [i for i in range(t.total) if i not in t.have]
        need = Need(t.tid, t.sha256, t.size, t.total, ranges_of(missing), reason)  # type: ignore[arg-type]
        t.round_last = need.missing[-1][1] - 1 if need.missing else None
        if self.port is not None and self.port.connected:
            self._send("need", str(self.topics.need(t.tid)), need.encode())

    def _watch_transfer(self, job: _Job) -> None:
        t = job.transfer
        if t is None or job is not self.job:
            return
        now = time.monotonic()
        if now - t.started > TRANSFER_TIMEOUT_S:
            have = f"{len(t.have)} of {t.total or '?'} chunks"
            self._finish(job, Phase.FAILED, UpdateCode.TRANSFER_FAILED,
                         f"transfer {t.tid}: gave up after {TRANSFER_TIMEOUT_S:g} s with {have}",
                         {"chunks": len(t.have), "total": t.total or 0, "dropped": t.dropped})  # fmt: skip
            return
        if now - t.last_news >= CHUNK_TIMEOUT_S:
            self._ask(t, "silence")
            t.last_news = now
        t.timer = self.reactor.call_later(0.2, lambda: self._watch_transfer(job))

    def on_chunk(self, payload: bytes) -> None:
        job = self.job
        t = None if job is None else job.transfer
        if job is None or t is None or not self.online:
            return
        try:
            chunk = decode_chunk(payload)
        except TransferError:
            t.dropped += 1
            return
        if chunk.bundle_sha256 != t.sha256 or chunk.bundle_size != t.size:
            t.dropped += 1
            return
        if t.total is None:
            t.total, t.chunk_size = chunk.total, chunk.chunk_size
            t.data = bytearray(t.size)
        elif (chunk.total, chunk.chunk_size) != (t.total, t.chunk_size):
            t.dropped += 1
            return
        if chunk.index in t.have:
            return
        assert t.data is not None
        t.data[chunk.offset : chunk.offset + len(chunk.payload)] = chunk.payload
        t.have.add(chunk.index)
        t.last_news = time.monotonic()
        if len(t.have) < t.total:
            last = t.round_last if t.round_last is not None else t.total - 1
            if chunk.index == last:
                self._ask(t, "gap")
            return
        data, seconds = bytes(t.data), time.monotonic() - t.started
        self._stop_work(job)
        if hashlib.sha256(data).hexdigest() != t.sha256:
            self._finish(job, Phase.FAILED, UpdateCode.HASH_MISMATCH,
                         f"transfer {t.tid}: the sha256 of the bundle differs from the deploy's")  # fmt: skip
            return
        self._downloaded(job, seconds)


def _tunable(key: str, value: Any) -> Any:
    if key == "log_level":
        if value not in LOG_LEVELS:
            raise CommandError(
                "config.invalid", f"log_level: must be one of {', '.join(LOG_LEVELS)}"
            )
        return value
    if key == "batching.enabled":
        if not isinstance(value, bool):
            raise CommandError("config.invalid", "batching.enabled: must be true or false")
        return value
    kind, low, high = TUNABLE_BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise CommandError(
            "config.invalid", f"{key}: {value!r} must be a number from {low:g} to {high:g}"
        )
    if kind is int and not isinstance(value, int):
        raise CommandError("config.invalid", f"{key}: {value!r} must be an integer")
    return kind(value)


# --------------------------------------------------------------------------- HTTP


def _download(url: str, size: int, sha256: str, timeout_s: float = 10.0) -> float:
    """GET the bundle as the device does (sha256 and the signed size checked); seconds."""
    started = time.monotonic()
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn_type = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    attempts = 0
    while True:
        attempts += 1
        try:
            conn = conn_type(parts.hostname or "", parts.port, timeout=timeout_s)
            try:
                conn.request("GET", path, headers={"Accept-Encoding": "identity"})
                response = conn.getresponse()
                if response.status != 200:
                    raise UpdateError(
                        UpdateCode.DOWNLOAD_FAILED,
                        f"{url} answered HTTP {response.status} {response.reason[:60]} "
                        f"(0 of {size} bytes down)",
                        status=response.status,
                    )
                digest = hashlib.sha256()
                got = 0
                while True:
                    block = response.read(min(65536, size + 1 - got))
                    if not block:
                        break
                    got += len(block)
                    if got > size:
                        raise UpdateError(
                            UpdateCode.OVERSIZE,
                            f"{url} sent more than the signed size of {size} bytes",
                            size=size,
                        )
                    digest.update(block)
            finally:
                conn.close()
        except OSError as exc:
            if attempts < 3:
                time.sleep(0.1 * attempts)
                continue
            raise UpdateError(
                UpdateCode.DOWNLOAD_FAILED, f"{url}: {exc} after {attempts} attempts"
            ) from None
        if got < size:
            raise UpdateError(
                UpdateCode.DOWNLOAD_FAILED,
                f"{url}: the whole file is {got} bytes, shorter than the signed {size}",
                written=got,
                size=size,
            )
        if digest.hexdigest() != sha256:
            raise UpdateError(
                UpdateCode.HASH_MISMATCH,
                f"sha256 of the download is {digest.hexdigest()[:16]}…, the deploy says "
                f"{sha256[:16]}…",
            )
        return time.monotonic() - started


__all__ = ["COMMANDS", "Knobs", "Port", "Shared", "Signal", "SimDevice", "model_sha", "replace"]
