"""TLS (server and mutual), passwords from $CREDENTIALS_DIRECTORY, and broker ACLs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.config.typed import ConfigError
from agent.link.client import Ack
from agent.protocol.topics import DeviceTopics, Topic
from tests.agent.mqtt.conftest import DEVICE, MakeHarness, agent_config, listening, wait_until
from tests.mqtt_broker import Broker, device_acl, make_pki

OPEN = {"require_signature": False}


def test_mutual_tls_telemetry_arrives(tmp: Path, harness: MakeHarness) -> None:
    pki = make_pki(tmp / "pki")
    cert, key = pki.client(DEVICE)
    console_cert, console_key = pki.client("console")
    with Broker(tmp, pki=pki, require_certificate=True) as broker:
        tls = {"enabled": True, "ca_file": str(pki.ca_cert), "cert_file": str(cert),
               "key_file": str(key)}  # fmt: skip
        h = harness(agent_config(tmp, broker, None, commands=OPEN,
                                 mqtt={"host": "localhost", "tls": tls}))  # fmt: skip
        h.wait_connected()
        tls_files = (pki.ca_cert, console_cert, console_key)
        with listening(broker, f"edgerun/v1/{DEVICE}/telemetry", tls=tls_files) as feed:
            assert feed.wait_for(lambda f: len(f.on("/telemetry")) >= 2)
        # The broker's log names the client certificate's identity as the user.
        assert DEVICE in broker.log()


def test_tls_without_client_certificate_or_with_unknown_ca_never_connects(
    tmp: Path, harness: MakeHarness
) -> None:
    pki = make_pki(tmp / "pki")
    other = make_pki(tmp / "other", name="someone-else")
    with Broker(tmp, pki=pki, require_certificate=True) as broker:
        no_cert = harness(agent_config(tmp / "a", broker, None, commands=OPEN,
                                       mqtt={"tls": {"enabled": True, "ca_file": str(pki.ca_cert)}}))  # fmt: skip
        cert, key = other.client(DEVICE)
        wrong_ca = harness(agent_config(tmp / "b", broker, None, commands=OPEN, mqtt={"tls": {
            "enabled": True, "ca_file": str(other.ca_cert), "cert_file": str(cert),
            "key_file": str(key)}}))  # fmt: skip
        for h in (no_cert, wrong_ca):
            assert wait_until(lambda h=h: h.link.client.last_error)
            time.sleep(0.3)  # a few more attempts
            assert h.link.client.connections == 0
            # ... and the device still serves local inference.
            assert h.agent.host.ready()
        assert "certificate verify failed" in wrong_ca.link.client.last_error.lower() or (
            "verification failed" in wrong_ca.link.client.last_error.lower()
        )


def test_password_from_credentials_directory(tmp: Path, harness: MakeHarness) -> None:
    creds = tmp / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "wrong").write_text("nope\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    with Broker(tmp, users={DEVICE: "s3cret"}) as broker:
        good = harness(agent_config(tmp / "a", broker, None, commands=OPEN, mqtt={
            "username": DEVICE, "password": "credential:mqtt-password"}), environ=env)  # fmt: skip
        good.wait_connected()
        bad = harness(agent_config(tmp / "b", broker, None, commands=OPEN, mqtt={
            "username": DEVICE, "password": "credential:wrong", "client_id": "dev-a-2"}),
            environ=env)  # fmt: skip
        assert wait_until(lambda: "refused" in bad.link.client.last_error)
        assert bad.link.client.connections == 0 and good.link.client.connections == 1
    with pytest.raises(ConfigError, match="mqtt.password"):
        harness(agent_config(tmp / "c", None, None, commands=OPEN, mqtt={
            "username": DEVICE, "password": "credential:missing"}), environ=env)  # fmt: skip


def test_a_device_cannot_publish_to_another_devices_topics(tmp: Path, harness: MakeHarness) -> None:
    users = {"dev-a": "pa", "dev-b": "pb", "console": "pc"}
    with Broker(tmp, users=users, acl=device_acl(["console"])) as broker:
        creds = tmp / "pw"
        creds.write_text("pa")
        h = harness(agent_config(tmp, broker, None, commands=OPEN, mqtt={
            "username": "dev-a", "password": str(creds)}))  # fmt: skip
        h.wait_connected()
        with listening(broker, "edgerun/v1/#", username="console", password="pc") as spy:
            client = h.link.client
            acks: list[Ack] = []
            forged = DeviceTopics("dev-b")
            for topic in (forged.telemetry, forged.status, Topic("edgerun/v1/dev-b/cmd/ping")):
                client.publish(topic, b'{"forged": true}', on_ack=acks.append)
            client.publish(DeviceTopics("dev-a").events, b'{"marker": true}', on_ack=acks.append)
            assert spy.wait_for(
                lambda f: f.on("dev-a/events") and b"marker" in f.on("dev-a/events")[-1]
            )
            # The broker refused each forged message (MQTT v5 PUBACK "Not authorized")...
            deadline = time.monotonic() + 5
            while len(acks) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [a.ok for a in acks] == [False, False, False, True]
            assert all(a.permanent and a.code == 0x87 for a in acks[:3])
            # ... and nobody received them (the marker, sent after them, did arrive).
            assert not any(b"forged" in p for _, p, _, _ in spy.messages)
        # The device's own streams flow as usual.
        assert h.link.outbox.dropped_total() == {"telemetry": 0, "event": 0}
