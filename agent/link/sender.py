"""Drains the outbox to the broker: in order, a window of QoS 1 messages in flight,
rows deleted only after their PUBACK. After a reconnect it starts again from the
oldest unacknowledged row, so a message may arrive twice (receivers deduplicate by
sequence number) but never not at all."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from agent.link.client import Ack, MqttClient, MqttError, NotConnectedError
from agent.outbox import Outbox, OutboxError, Row
from agent.protocol.topics import Topic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Result:
    row: Row
    ack: Ack


class OutboxSender:
    def __init__(
        self,
        outbox: Outbox,
        client: MqttClient,
        window: int,
        on_dropped: Callable[[dict[str, int]], None],
        prune_every_s: float = 30.0,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.window = window
        self.on_dropped = on_dropped
        self.prune_every_s = prune_every_s
        self.sent = 0  # PUBACKed messages since start
        self._cond = threading.Condition()
        self._results: list[_Result] = []
        self._dirty = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        """Something changed: a new row, a new connection."""
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _on_ack(self, row: Row, ack: Ack) -> None:  # network thread
        with self._cond:
            self._results.append(_Result(row, ack))
            self._cond.notify()

    def _run(self) -> None:
        inflight: set[int] = set()
        last_sent = 0
        connection = -1
        next_prune = time.monotonic()
        while True:
            with self._cond:
                if not (self._dirty or self._results or self._stopping):
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
                self._dirty = False
                results, self._results = self._results, []
            try:
                last_sent = self._settle(results, inflight, last_sent)
                if self.client.connections != connection:
                    # A new connection: whatever was in flight may not have arrived.
                    connection = self.client.connections
                    inflight.clear()
                    last_sent = 0
                if self.client.connected and len(inflight) < self.window:
                    last_sent = self._send(inflight, last_sent)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.prune_every_s
                    self.outbox.prune()
                dropped = self.outbox.take_dropped()
                if dropped:
                    self.on_dropped(dropped)
            except OutboxError as exc:
                log.error("%s", exc)
                time.sleep(1.0)
            except Exception:  # the sender must outlive any surprise
                log.exception("outbox sender failed; retrying")
                time.sleep(1.0)

    def _settle(self, results: list[_Result], inflight: set[int], last_sent: int) -> int:
        done: list[int] = []
        for result in results:
            row, ack = result.row, result.ack
            inflight.discard(row.id)
            if ack.ok:
                done.append(row.id)
            elif ack.permanent:
                log.error(
                    "broker refused %s #%d on %s: %s; dropping it",
                    row.kind, row.seq, row.topic, ack.reason,
                )  # fmt: skip
                done.append(row.id)
                self.outbox.count_dropped("refused", row.kind, 1)
            elif ack.code >= 0x80 and self.client.connected:
                # Refused for now (quota, server busy): send it again from here.
                last_sent = min(last_sent, row.id - 1)
        if done:
            self.sent += self.outbox.ack(done)
        return last_sent

    def _send(self, inflight: set[int], last_sent: int) -> int:
        for row in self.outbox.pending(last_sent, self.window):
            if len(inflight) >= self.window:
                break
            if row.id not in inflight:
                try:
                    # Telemetry is retained: a console that starts (or a device table
                    # that is opened) sees every device's latest report at once instead
                    # of waiting an interval. Rows go out in order, so the retained one
                    # is the newest, also after a backlog is flushed.
                    self.client.publish(
                        Topic(row.topic),
                        row.payload,
                        qos=1,
                        retain=row.kind == "telemetry",
                        on_ack=partial(self._on_ack, row),
                    )
                except NotConnectedError:
                    break
                except MqttError as exc:
                    log.error("cannot send %s #%d: %s; dropping it", row.kind, row.seq, exc)
                    self.outbox.ack([row.id])
                    self.outbox.count_dropped("refused", row.kind, 1)
                else:
                    inflight.add(row.id)
            last_sent = max(last_sent, row.id)
        return last_sent
