"""The MQTT link: status, state, telemetry, events and commands over one connection.

Threads: `mqtt-net` (paho loop, reconnects), `mqtt-outbox` (drains the outbox),
`mqtt-commands` (runs commands one at a time, so a slow `infer` never stalls the
network loop). The asyncio side only schedules telemetry. Local inference never
waits for any of this.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent import __version__
from agent.bundle import BundleError
from agent.config.model import AgentConfig
from agent.config.typed import ConfigError
from agent.events import Emit, Event
from agent.link import settings
from agent.link.client import Message, MqttClient, MqttError
from agent.link.commands import Dispatcher, RefusalReporter, Request
from agent.link.handlers import build_table, config_as_json
from agent.link.logring import LogRing
from agent.link.replies import ReplyCache
from agent.link.sender import OutboxSender
from agent.link.telemetry import (
    SystemProbe,
    accelerator_figures,
    inference_figures,
    model_figures,
    watch_figures,
)
from agent.link.transfer import LinkTransfers, mqtt_fetchers
from agent.link.tunables import Tunables
from agent.link.twin import DesiredVersions, TwinLink
from agent.outbox import Kind, Outbox, OutboxError
from agent.protocol.events import EventKind
from agent.protocol.messages import Code, EventMessage, Status, TelemetryMessage, dumps, shown
from agent.protocol.state import Health, ModelInfo, ReportedState, Slots
from agent.protocol.topics import DeviceTopics, command_subscriptions, is_legacy_command_filter
from agent.protocol.update import MqttSource

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"
INBOX_LIMIT = 256  # commands waiting to run; beyond that they are dropped (flood)
INBOX_BYTES = 8 << 20  # and at most this many payload bytes waiting


class Link:
    def __init__(self, agent: Any, environ: Mapping[str, str] | None = None) -> None:
        config: AgentConfig = agent.config
        issues = settings.check(config)
        if issues:
            raise ConfigError(issues, "mqtt link")
        self.agent = agent
        self.config = config
        self.unportable = settings.portability_warnings(config)
        for problem in self.unportable:
            log.warning("%s", problem)
        self._legacy_refused_said = False
        # Typed, so mypy refuses a bare string kind here (agent is Any).
        self.emit: Emit = agent.events.emit
        self.started = time.time()
        self.topics = DeviceTopics(config.device_id)
        # What can fail on a bad config goes first, before files and threads exist.
        client_settings = settings.client_settings(config, self.started, environ)
        keys = settings.console_keys(config, environ)
        path = config.state_dir / OUTBOX_FILE
        self.outbox = Outbox(
            path,
            max_bytes=int(config.outbox.max_mb * 1024 * 1024),
            max_age_s=config.outbox.max_age_s,
            synchronous=config.outbox.synchronous,
        )
        self.replies = ReplyCache(
            path, config.commands.reply_cache_size, config.commands.reply_cache_age_s
        )
        self.tunables = Tunables(agent)
        self.logs = LogRing(config.commands.log_lines)
        self.logs.install()
        self.client = MqttClient(
            client_settings,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_message=self._on_message,
        )
        self.updates = getattr(agent, "updates", None)
        self.table = build_table(
            agent,
            self.tunables,
            self.logs,
            self.link_status,
            self.updates,
            signed=config.commands.require_signature,
        )
        # MQTT bundle transfers (agent/update/fetch/mqtt.py): the ChunkTransport port;
        # `transfer` deploys are fetched over this connection, so the link registers them.
        self.transfers = LinkTransfers(self.client, self.topics)
        if self.updates is not None:
            self.updates.add_fetcher(MqttSource, mqtt_fetchers(self.transfers, config))
        self.dispatcher = Dispatcher(
            device_id=config.device_id,
            groups=config.mqtt.groups,
            table=self.table,
            keys=keys,
            require_signature=config.commands.require_signature,
            max_payload_bytes=config.commands.max_payload_kb * 1024,
            cache=self.replies,
            report=RefusalReporter(agent.events.emit),
            max_lifetime_s=config.commands.max_lifetime_s,
            clock_skew_s=config.commands.clock_skew_s,
        )
        self.sender = OutboxSender(
            self.outbox, self.client, config.mqtt.max_inflight, self._report_dropped
        )
        self.twin: TwinLink | None = None
        if config.kubeedge.enabled:
            self.twin = TwinLink(
                settings.twin_topics(config),
                self.client,
                self.twin_values,
                agent.events.emit,
                config.state_dir,
            )
        self.pull: DesiredVersions | None = None  # set by attach_pull when a release index is set
        self.probe = SystemProbe(config.state_dir)
        self.write_errors = 0
        self.online = threading.Event()  # connected, subscribed, status published
        self._closed = False
        self._put_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._state_sent: bytes | None = None
        self._previous_model: tuple[str, ModelInfo | None] | None = None
        self._inbox: queue.Queue[Message | None] = queue.Queue(INBOX_LIMIT)
        self._inbox_lock = threading.Lock()
        self._inbox_bytes = 0
        self._worker = threading.Thread(target=self._work, name="mqtt-commands", daemon=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "mqtt-telemetry")
        self._telemetry: asyncio.Task[None] | None = None
        self._interval_changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        agent.events.subscribe(self._on_event)
        self.tunables.on_change(self._on_tunables)
        if self.outbox.recovered_from is not None:
            self.emit(
                EventKind.OUTBOX_RECOVERED,
                f"the outbox was unreadable and was moved to {self.outbox.recovered_from}",
            )

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._interval_changed = asyncio.Event()
        self._worker.start()
        self.sender.start()
        self.client.start()
        self._telemetry = asyncio.create_task(self._telemetry_loop(), name="mqtt-telemetry")
        log.info(
            "MQTT link to %s:%d as %s (MQTT %s%s)",
            self.config.mqtt.host, self.config.mqtt.port, self.config.device_id,
            self.config.mqtt.protocol, ", TLS" if self.config.mqtt.tls.enabled else "",
        )  # fmt: skip

    async def stop(self) -> None:
        if self._telemetry is not None:
            self._telemetry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._telemetry
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.close)

    def close(self) -> None:
        """Say goodbye (retained `offline`), then stop every thread. Idempotent."""
        if self._closed:
            return
        self._inbox.put(None)
        self._worker.join(timeout=10)
        if self.client.connected:
            if self.twin is not None:
                self.twin.stopped()
            done = threading.Event()
            try:
                self.client.publish(
                    self.topics.status,
                    settings.offline_status(self.config, time.time(), "agent stopped"),
                    retain=True,
                    on_ack=lambda ack: done.set(),
                )
                done.wait(2.0)
            except MqttError as exc:
                log.debug("offline status not sent: %s", exc)
        self.sender.stop()
        self.client.stop()
        with self._put_lock:
            self._closed = True
            self.outbox.close()
        self.replies.close()
        self.logs.remove()
        self._executor.shutdown(wait=False)

    # ----------------------------------------------------------------- connection

    def _on_connect(self) -> None:  # network thread
        self.sender.kick()
        filters = command_subscriptions(self.config.device_id, self.config.mqtt.groups, self.table)
        if self.twin is not None:
            filters += self.twin.filters()
        filters += self.transfers.filters()
        self.client.subscribe(filters, on_done=self._on_subscribed)

    def _on_subscribed(self, refused: list[str]) -> None:  # network thread
        legacy = [f for f in refused if is_legacy_command_filter(f)]
        refused = [f for f in refused if not is_legacy_command_filter(f)]
        if legacy and not self._legacy_refused_said:
            # NATS refuses '.' in topics: the dotted spelling is only for old consoles,
            # the portable one (cmd/config-get) was granted. Normal there; said once.
            self._legacy_refused_said = True
            log.info(
                "the broker refused the %d legacy dotted command subscription(s) (e.g. %s): "
                "commands arrive on the portable spelling (cmd/config-get) only",
                len(legacy), legacy[0],
            )  # fmt: skip
        if refused:
            hint = (
                "; names with '.' are refused by brokers such as NATS: " + self.unportable[0]
                if self.unportable
                else "; check its ACL"
            )
            self.emit(
                EventKind.LINK_SUBSCRIPTION_REFUSED,
                f"the broker refused {len(refused)} subscription(s){hint}",
                topics=refused,
            )
        # "online" is said once commands can arrive: a console may send right away.
        status = Status(self.config.device_id, "online", __version__, time.time(), "connected")
        self.client.publish(self.topics.status, dumps(status.to_json()), retain=True)
        if self.twin is not None:
            self.twin.on_connect()  # asks for the twin; the report below is its one report
        self.publish_state(force=True)
        self.online.set()
        self.transfers.subscribed()

    def _on_disconnect(self, why: str) -> None:
        self.online.clear()
        self.sender.kick()

    def _on_message(self, message: Message) -> None:  # network thread: hand over, return
        if self.transfers.deliver(message):  # bundle chunks: off the command path
            return
        size = len(message.payload)
        with self._inbox_lock:
            fits = self._inbox_bytes + size <= INBOX_BYTES
            if fits:
                self._inbox_bytes += size
        if fits:
            try:
                self._inbox.put_nowait(message)
                return
            except queue.Full:
                with self._inbox_lock:
                    self._inbox_bytes -= size
        # A flood: the refusal reporter says so at most once a second, with a count.
        self.dispatcher.report(
            Code.BUSY,
            f"command queue full ({INBOX_LIMIT} messages or {INBOX_BYTES >> 20} MB waiting): "
            "dropped a message",
            topic=shown(message.topic, 200),
        )

    def _work(self) -> None:
        while True:
            message = self._inbox.get()
            if message is None:
                return
            with self._inbox_lock:
                self._inbox_bytes -= len(message.payload)
            try:
                self._handle(message)
            except Exception:
                log.exception("handling a message on %s failed", message.topic)

    def _handle(self, message: Message) -> None:
        if self.twin is not None and self.twin.handles(message.topic):
            self.twin.handle(message.payload)
            self.publish_state()
            return
        response = self.dispatcher.handle(
            Request(
                message.topic, message.payload, message.response_topic, message.correlation_data
            )
        )
        if response is None:
            return
        try:
            self.client.publish(
                response.topic, response.payload, correlation_data=response.correlation_data
            )
        except MqttError as exc:
            log.warning("reply to %s not sent: %s", response.topic, exc)

    # ----------------------------------------------------------------- state

    def state(self) -> ReportedState:
        agent = self.agent
        store = agent.store
        current, previous = store.link("current"), store.link("previous")
        effective = self.tunables.effective
        digest = hashlib.sha256(dumps(config_as_json(effective))).hexdigest()
        served = model_figures(agent)
        return ReportedState(
            device_id=self.config.device_id,
            agent_version=__version__,
            model=None
            if served is None
            else ModelInfo(
                served["name"],
                served["version"],
                served["sha256"],
                served["runtime"],
                served.get("variant", ""),
                served.get("variant_reason", ""),
                tuple(served.get("providers", ())),
            ),
            slots=Slots(
                current=None if current is None else current.name,
                previous=None if previous is None else previous.name,
            ),
            last_known_good=self._last_known_good(previous),
            groups=tuple(self.config.mqtt.groups),
            config_digest=digest,
            tunable=self.tunables.values(),
            health=Health(ready=agent.host.ready(), overloaded=agent.watcher.overloaded),
            desired={} if self.twin is None else dict(self.twin.desired),
            update=None if self.updates is None else self.updates.snapshot(),
        )

    def _last_known_good(self, previous: Path | None) -> ModelInfo | None:
        """The model in the `previous` slot, where a rollback goes. Its manifest is read
        once per slot change: state() runs after every event and telemetry report."""
        if previous is None:
            return None
        cached = self._previous_model
        if cached is not None and cached[0] == previous.name:
            return cached[1]
        try:
            manifest = self.agent.store.manifest(previous)
        except (BundleError, OSError) as exc:
            log.warning("previous slot %s: manifest unreadable: %s", previous.name, exc)
            info = None
        else:
            info = ModelInfo(manifest.name, manifest.version, previous.name)
        self._previous_model = (previous.name, info)
        return info

    def publish_state(self, force: bool = False) -> None:
        """Retained `state`, re-sent on every connect and whenever it changes; the twin's
        actual values too (they change apart from the state: a job's phase, p95_ms)."""
        self._publish_state(force)
        if self.twin is not None:
            self.twin.report()

    def _publish_state(self, force: bool) -> None:
        body = dumps(self.state().to_json())
        with self._state_lock:
            if not force and body == self._state_sent:
                return
            if not self.client.connected:
                self._state_sent = None
                return
            try:
                self.client.publish(self.topics.state, body, retain=True)
            except MqttError as exc:
                log.debug("state not sent: %s", exc)
                self._state_sent = None
                return
            self._state_sent = body

    def twin_values(self) -> dict[str, str]:
        model = self.agent.host.model
        health = (
            "overloaded"
            if self.agent.watcher.overloaded
            else ("ready" if self.agent.host.ready() else "not_ready")
        )
        # The served model's recent p95 (the trial's live-traffic recorder), else the
        # agent's since start.
        p95 = watch_figures(self.agent).get("live", {}).get("p95_ms")
        if p95 is None:
            p95 = self.agent.metrics.window(reset=False)["total"]["p95_ms"]
        status = (
            self.pull.model_status()
            if self.pull is not None
            else ("serving" if model is not None else "no_model")
        )
        return {
            "model_name": "" if model is None else model.manifest.name,
            "model_version": "" if model is None else model.manifest.version,
            "model_sha256": "" if model is None else model.sha256,
            "model_status": status,  # a job's phase, "serving", or "failed: <code>: <why>"
            "p95_ms": "" if p95 is None else f"{p95:g}",
            "agent_version": __version__,
            "health": health,
        }

    def attach_pull(self, pull: DesiredVersions) -> None:
        """Pull updates (agent/update/poll.py): the twin's desired versions go to them and
        `model_status` comes from them."""
        self.pull = pull
        if self.twin is not None:
            self.twin.attach(pull)

    def link_status(self) -> dict[str, Any]:
        depth = self.outbox.depth()
        return {
            "connected": self.client.connected,
            "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            "connections": self.client.connections,
            "last_error": self.client.last_error,
            "outbox": {"messages": depth.messages, "bytes": depth.bytes},
            "sent": self.sender.sent,
        }

    # ----------------------------------------------------------------- telemetry, events

    def _on_event(self, event: Event) -> None:  # any thread
        device = self.config.device_id

        def build(seq: int) -> bytes:
            message = EventMessage(device, seq, event.ts, event.kind, event.reason, event.data)
            return dumps(message.to_json())

        self._put("event", str(self.topics.events), build)
        # Most events follow a change of what `state` shows (overloaded and
        # overload.cleared, model swaps, update phases, twin desires): the kind says
        # which (EventKind.republishes_state); publish_state sends only a change.
        if event.kind.republishes_state:
            self.publish_state()

    def _put(self, kind: Kind, topic: str, build: Callable[[int], bytes]) -> None:
        with self._put_lock:
            if self._closed:
                return
            try:
                self.outbox.put(kind, topic, build)
            except (OutboxError, ValueError, TypeError) as exc:
                self.write_errors += 1
                log.error("%s lost: %s", kind, exc)
                return
        self.sender.kick()

    def report_telemetry(self) -> None:
        """Take one snapshot and queue it (the telemetry loop calls this)."""
        agent = self.agent
        interval = self.tunables.telemetry_interval_s
        inference = inference_figures(agent.metrics.window(reset=True))
        system = self.probe.read()
        model = model_figures(agent, live=True)
        accelerator = accelerator_figures(agent)
        depth = self.outbox.depth()
        outbox = {
            "messages": depth.messages,
            "bytes": depth.bytes,
            "oldest_age_s": depth.oldest_age_s,
            "dropped": self.outbox.dropped_total(),
            "write_errors": self.write_errors,
        }
        device = self.config.device_id

        def build(seq: int) -> bytes:
            message = TelemetryMessage(
                device, seq, time.time(), interval, inference, system, model, outbox, accelerator
            )
            return dumps(message.to_json())

        self._put("telemetry", str(self.topics.telemetry), build)
        self.publish_state()

    async def _telemetry_loop(self) -> None:
        assert self._interval_changed is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(
                    self._interval_changed.wait(), timeout=self.tunables.telemetry_interval_s
                )
                self._interval_changed.clear()  # a new interval: start counting afresh
                continue
            except TimeoutError:
                pass
            try:
                await loop.run_in_executor(self._executor, self.report_telemetry)
            except Exception:
                log.exception("telemetry report failed")

    def _on_tunables(self, applied: dict[str, Any]) -> None:  # command thread
        if "telemetry.interval_s" in applied and self._loop is not None:
            changed = self._interval_changed
            if changed is not None:
                self._loop.call_soon_threadsafe(changed.set)
        self.publish_state()

    def _report_dropped(self, dropped: dict[str, int]) -> None:  # sender thread
        causes = {"size": "outbox full (outbox.max_mb)", "age": "older than outbox.max_age_s",
                  "refused": "refused by the broker"}  # fmt: skip
        parts = []
        for key, n in sorted(dropped.items()):
            cause, _, kind = key.partition(".")
            parts.append(f"{n} {kind} message(s): {causes.get(cause, cause)}")
        self.emit(
            EventKind.OUTBOX_DROPPED,
            "dropped " + ", ".join(parts),
            **{k.replace(".", "_"): v for k, v in dropped.items()},
        )
