"""The link against a real mosquitto: status, state, telemetry, events, commands."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config.loader import parse_config
from agent.link import components_for
from agent.link.client import Message
from agent.link.commands import CommandSpec
from agent.link.link import INBOX_BYTES
from agent.protocol.canonical import sign_body
from agent.protocol.events import EventKind
from agent.protocol.messages import dumps, loads
from agent.protocol.topics import DeviceTopics, group_command, legacy_group_command
from agent.service import Agent
from tests.agent.mqtt.conftest import (
    DEVICE,
    Console,
    MakeHarness,
    agent_config,
    json_on,
    listening,
    wait_until,
)
from tests.helpers import samples
from tests.mqtt_broker import Broker, Listener

TOPICS = DeviceTopics(DEVICE)


def test_agent_without_mqtt_gets_no_link(tmp: Path) -> None:
    agent = Agent(parse_config({"state_dir": str(tmp / "s"), "api": {"socket": None}}, environ={}))
    assert agent.config.mqtt.enabled is False
    assert components_for(agent) == []
    assert not (tmp / "s" / "outbox.sqlite").exists()


def test_status_state_telemetry_and_events_arrive(
    tmp: Path, broker: Broker, console_pub: Path, harness: MakeHarness
) -> None:
    with listening(broker, f"{TOPICS.root}/#") as feed:
        h = harness(agent_config(tmp, broker, console_pub))
        assert feed.wait_for(lambda f: len(f.on("/telemetry")) >= 3, 15)
        status = json_on(feed, "/status")[0]
        assert status["state"] == "online" and status["device_id"] == DEVICE
        state = json_on(feed, "/state")[0]
        assert state["model"]["name"] == "digits" and state["model"]["version"] == "1.0.0"
        assert state["slots"]["current"] == state["model"]["sha256"]
        assert state["health"] == {"ready": True, "overloaded": False}
        # The model.loaded event happened before the broker connection: the outbox kept it.
        events = json_on(feed, "/events")
        assert events[0]["kind"] == "model.loaded" and events[0]["seq"] == 1
        h.agent.events.emit(EventKind.OVERLOADED, "test reason", rss_mb=1.0)
        assert feed.wait_for(lambda f: len(f.on("/events")) >= 2)
        assert json_on(feed, "/events")[1] == {
            **json_on(feed, "/events")[1], "seq": 2, "kind": "overloaded", "reason": "test reason",
        }  # fmt: skip
        telemetry = json_on(feed, "/telemetry")
        assert [t["seq"] for t in telemetry[:3]] == [1, 2, 3]
        first = telemetry[0]
        for key in (
            "cpu_percent",
            "rss_mb",
            "available_mb",
            "load",
            "temperatures_c",
            "disk_free_mb",
        ):
            assert key in first["system"], key
        assert first["model"]["sha256"] == state["model"]["sha256"]
        assert set(first["inference"]) == {"interval", "total"}
        assert {"messages", "bytes", "dropped"} <= set(first["outbox"])


def test_retained_status_state_and_will(
    tmp: Path, broker: Broker, console_pub: Path, harness: MakeHarness
) -> None:
    h = harness(agent_config(tmp, broker, console_pub))
    h.wait_connected()
    time.sleep(0.3)
    # A console that connects later still learns status and state (retained).
    with listening(broker, str(TOPICS.status), str(TOPICS.state)) as late:
        assert late.wait_for(lambda f: f.on("/status") and f.on("/state"))
        assert all(retained for _, _, retained, _ in late.messages)
        assert loads(late.on("/status")[0])["state"] == "online"
        # The broker speaks for a device that vanishes: the last will says offline.
        h.link.client._paho._sock.close()  # type: ignore[union-attr]  # an abrupt loss
        assert late.wait_for(
            lambda f: any(loads(p)["state"] == "offline" for p in f.on("/status")), 15
        )
        will = next(loads(p) for p in late.on("/status") if loads(p)["state"] == "offline")
        assert "last will" in will["reason"]
        # ... and on reconnect the device says online again, and re-sends its state.
        states_before = len(late.on("/state"))
        assert late.wait_for(lambda f: loads(f.on("/status")[-1])["state"] == "online", 15)
        assert late.wait_for(lambda f: len(f.on("/state")) > states_before)
    h.stop()
    with listening(broker, str(TOPICS.status)) as after:
        assert after.wait_for(lambda f: f.on("/status"))
        final = loads(after.on("/status")[-1])
        assert final["state"] == "offline" and final["reason"] == "agent stopped"


def test_the_latest_telemetry_is_retained_for_a_console_that_comes_later(
    tmp: Path, broker: Broker, console_pub: Path, harness: MakeHarness
) -> None:
    h = harness(agent_config(tmp, broker, console_pub, telemetry={"interval_s": 0.1}))
    h.wait_connected()
    with listening(broker, str(TOPICS.telemetry)) as live:
        assert live.wait_for(lambda f: len(f.on("/telemetry")) >= 3, 15)
    # A console opened later gets one message at once: the device's newest report.
    with listening(broker, str(TOPICS.telemetry)) as late:
        assert late.wait_for(lambda f: any(r for _, _, r, _ in f.messages), 15)
        retained = [loads(p) for _, p, r, _ in late.messages if r]
        assert len(retained) == 1
        newest_live = max(loads(p)["seq"] for p in live.on("/telemetry"))
        assert retained[0]["seq"] >= newest_live
        assert retained[0]["device_id"] == h.link.config.device_id
    h.stop()


@pytest.mark.parametrize("protocol", [5, 4])
def test_commands_round_trip(
    tmp: Path,
    broker: Broker,
    console_pub: Path,
    console_key: Ed25519PrivateKey,
    harness: MakeHarness,
    protocol: int,
) -> None:
    h = harness(
        agent_config(tmp, broker, console_pub, mqtt={"protocol": "5" if protocol == 5 else "3.1.1"})
    )
    h.wait_connected()
    console = Console(broker, console_key, protocol=protocol)
    try:
        reply = console.request("ping")
        assert reply["ok"] is True and reply["result"]["pong"] is True
        status = console.request("status")["result"]
        assert status["model"]["name"] == "digits" and status["link"]["connected"] is True
        inputs, labels = samples()
        reply = console.request("infer", {"inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(inputs[:2].shape),
             "data": inputs[:2].reshape(-1).tolist()}]})  # fmt: skip
        assert reply["ok"], reply
        out = reply["result"]["outputs"][0]
        scores = np.asarray(out["data"]).reshape(out["shape"])
        assert list(scores.argmax(axis=1)) == list(labels[:2])
        assert h.agent.metrics.requests == 1  # the same path (and metrics) as the local API
        logs = console.request("logs", {"lines": 5})["result"]["lines"]
        assert 0 < len(logs) <= 5 and any("command" in line for line in logs)
    finally:
        console.close()


def test_mosquitto_rr_gets_a_reply_to_ping(
    tmp: Path,
    broker: Broker,
    console_pub: Path,
    console_key: Ed25519PrivateKey,
    harness: MakeHarness,
) -> None:
    h = harness(agent_config(tmp, broker, console_pub))
    h.wait_connected()
    time.sleep(0.2)  # subscriptions settle
    body = sign_body(
        {"id": "rr-1", "name": "ping", "args": {}, "to": DEVICE, "expires_at": time.time() + 30},
        console_key,
    )
    result = subprocess.run(
        ["mosquitto_rr", "-h", broker.host, "-p", str(broker.port), "-V", "5",
         "-t", str(TOPICS.command("ping")), "-e", "edgerun/v1/console/rr/reply",
         "-m", dumps(body).decode(), "-W", "10", "-q", "1"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = loads(result.stdout.strip().encode())
    assert reply["id"] == "rr-1" and reply["ok"] is True
    assert reply["result"]["device_id"] == DEVICE


def test_unsigned_and_wrongly_signed_commands_are_refused(
    tmp: Path, broker: Broker, console_pub: Path, console: Console, harness: MakeHarness
) -> None:
    h = harness(agent_config(tmp, broker, console_pub))
    h.wait_connected()
    with listening(broker, str(TOPICS.events)) as feed:
        unsigned = {"id": "u1", "name": "ping", "args": {}, "to": DEVICE}
        reply = console.request_body(unsigned, str(TOPICS.command("ping")))
        assert reply == {**reply, "id": "u1", "ok": False}
        assert reply["error"]["code"] == "command.unsigned"
        intruder = sign_body(
            {"id": "w1", "name": "ping", "args": {}, "to": DEVICE, "expires_at": time.time() + 9},
            Ed25519PrivateKey.generate(),
        )
        reply = console.request_body(intruder, str(TOPICS.command("ping")))
        assert reply["error"]["code"] == "command.bad_signature"
        # Tampering after signing breaks the signature too.
        signed = console.body("config.set", {"values": {"log_level": "info"}})
        signed["args"]["values"]["log_level"] = "debug"
        reply = console.request_body(signed, str(TOPICS.command("config.set")))
        assert reply["error"]["code"] == "command.bad_signature"
        assert h.link.tunables.values()["log_level"] == "info"

        def refused(f: Listener) -> list[dict[str, Any]]:
            return [e for e in json_on(f, "/events") if e["kind"] == "command.refused"]

        want = {"command.unsigned", "command.bad_signature"}
        assert feed.wait_for(lambda f: {e["data"]["code"] for e in refused(f)} >= want)
        assert all(e["reason"] for e in refused(feed))


def test_config_set_changes_the_telemetry_interval(
    tmp: Path, broker: Broker, console_pub: Path, console: Console, harness: MakeHarness
) -> None:
    h = harness(agent_config(tmp, broker, console_pub, telemetry={"interval_s": 30.0}))
    h.wait_connected()
    with listening(broker, str(TOPICS.telemetry), str(TOPICS.state)) as feed:
        time.sleep(0.5)
        assert feed.on("/telemetry") == []
        reply = console.request(
            "config.set", {"values": {"telemetry.interval_s": 0.1, "log_level": "debug"}}
        )
        assert reply["ok"], reply
        assert reply["result"]["applied"] == {"telemetry.interval_s": 0.1, "log_level": "debug"}
        assert feed.wait_for(lambda f: len(f.on("/telemetry")) >= 3)
        assert feed.wait_for(
            lambda f: any(
                loads(p)["tunable"]["telemetry.interval_s"] == 0.1 for p in f.on("/state")
            )
        )
        refused = console.request("config.set", {"values": {"memory.max_mb": 10}})
        assert refused["error"]["code"] == "config.not_tunable"
        assert "memory.max_mb" in refused["error"]["message"]
        bad = console.request("config.set", {"values": {"telemetry.interval_s": -1}})
        assert bad["error"]["code"] == "config.invalid"
        assert "telemetry.interval_s" in bad["error"]["message"]
        got = console.request("config.get", {"keys": ["telemetry.interval_s", "mqtt.port"]})
        assert got["result"]["values"] == {"telemetry.interval_s": 0.1, "mqtt.port": broker.port}


def test_group_commands_and_targets(
    tmp: Path, broker: Broker, console_pub: Path, console: Console, harness: MakeHarness
) -> None:
    harness(
        agent_config(tmp, broker, console_pub, mqtt={"groups": ["lab", "floor-2"]})
    ).wait_connected()
    reply = console.request("ping", topic=str(group_command("floor-2", "ping")), to="group:floor-2")
    assert reply["ok"] is True and reply["device_id"] == DEVICE  # which member answered
    # A body addressed to one target cannot be replayed to another.
    reply = console.request("ping", topic=str(group_command("lab", "ping")), to="group:floor-2")
    assert reply["error"]["code"] == "command.wrong_target"
    reply = console.request("ping", to="other-device")
    assert reply["error"]["code"] == "command.wrong_target"
    # A group this device is not in: the broker never delivers it (no subscription).


def test_both_spellings_of_a_command_topic_reach_the_device(
    tmp: Path, broker: Broker, console_pub: Path, console: Console, harness: MakeHarness
) -> None:
    harness(agent_config(tmp, broker, console_pub, mqtt={"groups": ["lab"]})).wait_connected()
    keys = {"keys": ["telemetry.interval_s"]}
    portable = console.request("config.get", keys, topic=str(TOPICS.command("config.get")))
    assert "/cmd/config-get" in str(TOPICS.command("config.get"))
    # What a console of an earlier release sends: the dotted spelling, still taken.
    legacy = console.request("config.get", keys, topic=str(TOPICS.legacy_command("config.get")))
    assert portable["ok"] and legacy["ok"] and portable["result"] == legacy["result"]
    grouped = console.request("update.status", topic=str(legacy_group_command("lab", "update.status")),
                              to="group:lab")  # fmt: skip
    assert grouped["device_id"] == DEVICE
    # The body's name must still match the topic's, in either spelling.
    body = console.body("config.get", keys)
    reply = console.request_body(body, str(TOPICS.command("config.set")))
    assert reply["error"]["code"] == "command.mismatch", reply


def test_repeated_id_gets_the_first_reply_also_after_restart(
    tmp: Path, broker: Broker, console_pub: Path, console: Console, harness: MakeHarness
) -> None:
    data = agent_config(tmp, broker, console_pub)
    h = harness(data)
    h.wait_connected()
    body = console.body("ping", id="same-id")
    topic = str(TOPICS.command("ping"))
    first = console.request_body(body, topic)
    again = console.request_body(body, topic)
    assert first == again and first["ok"]
    h.stop()
    h2 = harness(data)
    h2.wait_connected()
    assert console.request_body(body, topic) == first
    # The digest survived the restart too: the same id on another body is refused.
    other = console.body("ping", id="same-id", expires_at=body["expires_at"] + 1)
    assert console.request_body(other, topic)["error"]["code"] == "command.id_reused"
    # Expiry is checked after the cache: a retransmission of an executed command
    # gets its reply; a new command past its expiry is refused.
    stale = console.body("ping", expires_at=time.time() - 5)
    assert console.request_body(stale, topic)["error"]["code"] == "command.expired"


def test_bad_commands_get_error_replies_and_the_device_keeps_serving(
    tmp: Path, broker: Broker, console_pub: Path, console: Console, harness: MakeHarness
) -> None:
    h = harness(agent_config(tmp, broker, console_pub, commands={"max_payload_kb": 1}))
    h.wait_connected()
    topic = str(TOPICS.command("ping"))
    cases = {
        b"not json": "command.malformed",
        b"[1, 2]": "command.malformed",
        b'{"id": "x"}': "command.malformed",
        b"{" + b" " * 2000 + b"}": "command.too_large",
    }
    for payload, code in cases.items():
        reply = console.request_raw(payload, topic)
        assert reply["ok"] is False and reply["error"]["code"] == code, (payload[:20], reply)
        assert reply["error"]["message"]
    reply = console.request("logs", {"lines": "ten"})
    assert reply["error"]["code"] == "command.bad_args" and "lines" in reply["error"]["message"]
    reply = console.request("logs", {"colour": "red"})
    assert reply["error"]["code"] == "command.bad_args"
    reply = console.request(
        "infer",
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]},
    )
    assert reply["error"]["code"] == "input.mismatch"
    assert console.request("ping")["ok"] is True
    assert h.agent.host.ready()


def test_retained_state_follows_overload_and_its_clearing(
    tmp: Path, broker: Broker, harness: MakeHarness
) -> None:
    """The memory watcher flips `overloaded` (events `overloaded`, `overload.cleared`);
    the retained state must follow both ways without waiting for a telemetry tick
    (none comes within the test). The harness runs no watcher thread: sample by hand."""
    h = harness(agent_config(tmp, broker, None, commands={"require_signature": False},
                             telemetry={"interval_s": 3600.0}))  # fmt: skip
    h.wait_connected()
    watcher = h.agent.watcher
    normal = watcher.budget
    with listening(broker, str(TOPICS.state)) as feed:
        assert feed.wait_for(lambda f: f.on("/state"))
        # What a growing RSS does: the same budget with a 1 MiB soft limit.
        watcher.budget = dataclasses.replace(normal, soft_limit_bytes=1 << 20)
        watcher.sample()
        assert feed.wait_for(lambda f: json_on(f, "/state")[-1]["health"]["overloaded"])
        watcher.budget = normal
        watcher.sample()
        assert h.agent.events.recent[-1].kind == "overload.cleared"
        assert feed.wait_for(lambda f: not json_on(f, "/state")[-1]["health"]["overloaded"])
    assert not watcher.overloaded
    with listening(broker, str(TOPICS.state)) as late:  # what a console connecting now sees
        assert late.wait_for(lambda f: f.on("/state"))
        assert json_on(late, "/state")[-1]["health"] == {"ready": True, "overloaded": False}


def test_the_broker_never_hands_the_device_a_packet_far_over_the_command_limit(
    tmp: Path, broker: Broker, console_pub: Path, console: Console, harness: MakeHarness
) -> None:
    """MQTT v5 Maximum Packet Size: a 4 MB command is dropped by the broker, so the
    device never reads it into memory; one just over the limit still gets its reply."""
    h = harness(agent_config(tmp, broker, console_pub))
    h.wait_connected()
    topic = str(TOPICS.command("ping"))
    with listening(broker, str(TOPICS.events)) as feed:
        console.send_raw(topic, b"{" + b" " * (4 << 20) + b"}")
        near = console.request_raw(b"{" + b" " * (70 << 10) + b"}", topic)
        assert near["error"]["code"] == "command.too_large" and "65536" in near["error"]["message"]
        assert console.request("ping")["ok"]
        assert feed.wait_for(
            lambda f: any(e["kind"] == "command.refused" for e in json_on(f, "/events"))
        )
        sizes = [e["reason"] for e in json_on(feed, "/events") if e["kind"] == "command.refused"]
        assert not any("4194306 bytes" in reason for reason in sizes), sizes


def test_a_command_flood_is_bounded_in_bytes_and_reported(
    tmp: Path, broker: Broker, harness: MakeHarness
) -> None:
    """While one command runs, at most INBOX_BYTES of others wait; the rest are dropped
    with a (rate-limited) `command.busy` refusal, and the queue drains afterwards."""
    h = harness(agent_config(tmp, broker, None, commands={"require_signature": False}))
    h.wait_connected()
    release = threading.Event()
    h.link.dispatcher.table["test.block"] = CommandSpec(
        "test.block", "holds the command thread", (), lambda args: release.wait(30)
    )
    block = {"id": "block", "name": "test.block", "to": DEVICE}
    h.link._on_message(Message(str(TOPICS.command("test.block")), dumps(block), 1, False))
    junk = b"x" * (64 << 10)
    for _ in range(200):  # 12.5 MB, more than INBOX_BYTES
        h.link._on_message(Message(str(TOPICS.command("ping")), junk, 1, False))
    busy = [e for e in h.agent.events.recent if e.data.get("code") == "command.busy"]
    assert busy and "8 MB" in busy[0].reason
    assert h.link._inbox_bytes <= INBOX_BYTES
    release.set()
    assert wait_until(lambda: h.link._inbox_bytes == 0 and h.link._inbox.empty())
