"""A real `edge-agent run` process: its outbox survives kill -9; SIGTERM says goodbye."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from agent.protocol.messages import loads
from tests.agent.mqtt.conftest import json_on, listening
from tests.helpers import AgentProcess, base_config, samples, write_config
from tests.mqtt_broker import Broker

DEVICE = "test-device"  # what tests.helpers.base_config names it


def outbox_rows(state: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [(k, int(s)) for k, s in db.execute("SELECT kind, seq FROM messages ORDER BY id")]
    finally:
        db.close()


def config_text(tmp: Path, broker: Broker) -> str:
    return base_config(tmp) + (
        f"[mqtt]\nenabled = true\nport = {broker.port}\nreconnect_min_s = 0.1\n"
        "reconnect_max_s = 0.5\n[telemetry]\ninterval_s = 0.1\n"
        "[commands]\nrequire_signature = false\n"
    )


def test_outbox_survives_kill_9_of_the_agent(tmp: Path) -> None:
    broker = Broker(tmp)  # configured, not started: the device is offline
    config = write_config(tmp / "agent.toml", config_text(tmp, broker))
    state = tmp / "state"
    agent = AgentProcess(config, tmp / "api.sock")
    try:
        agent.wait_ready()
        # No broker at all: local inference is served all the same.
        inputs, labels = samples()
        with agent.client() as api:
            scores = api.infer("digits", {"input": inputs[:4]})["logits"]
        assert list(scores.argmax(axis=1)) == list(labels[:4])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (state / "outbox.sqlite").exists() and sum(
                k == "telemetry" for k, _ in outbox_rows(state)
            ) >= 10:
                break
            time.sleep(0.1)
        agent.proc.kill()  # SIGKILL: no shutdown code runs
        agent.proc.wait()
    finally:
        agent.stop()
    rows = outbox_rows(state)
    telemetry = [s for k, s in rows if k == "telemetry"]
    assert len(telemetry) >= 10 and telemetry == list(range(1, len(telemetry) + 1))
    assert ("event", 1) in rows  # model.loaded, queued while offline
    with broker, listening(broker, f"edgerun/v1/{DEVICE}/#") as feed:
        again = AgentProcess(config, tmp / "api.sock")
        try:
            again.wait_ready()
            want = set(range(1, len(telemetry) + 6))
            assert feed.wait_for(
                lambda f: {t["seq"] for t in json_on(f, "/telemetry")} >= want, 30
            ), again.output()
            events = json_on(feed, "/events")
            assert feed.wait_for(lambda f: len(f.on("/events")) >= 2)
            events = json_on(feed, "/events")
            # The first run's event, then the second run's, numbered on.
            assert [(e["seq"], e["kind"]) for e in events[:2]] == [
                (1, "model.loaded"),
                (2, "model.loaded"),
            ]
            assert again.stop() == 0
        finally:
            again.stop()
        assert feed.wait_for(lambda f: loads(f.on("/status")[-1])["state"] == "offline")
        assert loads(feed.on("/status")[-1])["reason"] == "agent stopped"
    # What the broker acknowledged was deleted: the old backlog is gone for good.
    assert all(seq > len(telemetry) + 5 for kind, seq in outbox_rows(state) if kind == "telemetry")
    assert ("event", 1) not in outbox_rows(state)
