"""FleetClient against real `edge-agent run` processes on a real mosquitto: signed
commands and their replies, refusals, timeouts, offline devices (last will), a dropped
connection, MQTT 3.1.1, and TLS + passwords + the recommended ACL. Every path leaves no
pending reply behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.canonical import verify_body
from agent.signing import key_id
from fleet.config import FleetConfig
from fleet.errors import FleetCode, FleetError
from fleet.mqtt import SEND_WINDOW, FleetClient
from fleet.view import FleetView
from tests.fleet._agents import agents
from tests.fleet.conftest import CONSOLE_PASSWORD, SecureBroker
from tests.helpers import AgentProcess, samples
from tests.mqtt_broker import Broker, free_port

DEVICES = ["cl-a", "cl-b"]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, broker: Broker, console_pub: Path
) -> Iterator[dict[str, AgentProcess]]:
    with agents(tmp_path_factory.mktemp("agents"), broker, DEVICES, console_pub) as procs:
        yield procs


@pytest.fixture(scope="module")
def client(
    fleet: dict[str, AgentProcess], broker: Broker, console_key: Ed25519PrivateKey
) -> Iterator[FleetClient]:
    config = FleetConfig.load(None, broker=f"mqtt://{broker.host}:{broker.port}", timeout_s=10)
    with FleetClient(config, key=console_key) as c:
        view = FleetView(c).start()
        # Commands sent before a device subscribed would be lost: wait for its status.
        assert view.wait(lambda v: all((r := v.row(d)) and r.online for d in DEVICES), 60)
        yield c
        assert c.pending() == 0


def test_commands_are_signed_bound_and_answered(
    client: FleetClient, console_key: Ed25519PrivateKey
) -> None:
    sent: list[tuple[dict[str, Any], str]] = []
    replies: list[tuple[str, Any]] = []
    client.on_sent = lambda body, target: sent.append((dict(body), target))
    client.on_reply = lambda command_id, reply: replies.append((command_id, reply))
    try:
        reply = client.request("cl-a", "ping")
    finally:
        client.on_sent = client.on_reply = None
    assert reply.ok and reply.result["pong"] is True and reply.device_id == "cl-a"
    assert client.key_id == key_id(console_key.public_key())
    body, target = sent[0]
    assert target == "cl-a" and body["to"] == "cl-a" and body["name"] == "ping"
    assert 0 < body["expires_at"] - body["issued_at"] <= 60
    assert verify_body(body, [console_key.public_key()]) == client.key_id
    assert replies == [(body["id"], reply)]
    status = client.request("cl-b", "status")
    assert status.ok and status.result["link"]["connected"] is True


def test_config_set_infer_logs_and_a_refusal(client: FleetClient) -> None:
    applied = client.request("cl-a", "config.set", {"values": {"log_level": "debug"}})
    assert applied.ok and applied.result["applied"] == {"log_level": "debug"}
    assert client.request("cl-a", "config.set", {"values": {"log_level": "info"}}).ok
    refused = client.request("cl-a", "config.set", {"values": {"mqtt.port": 1}})
    assert not refused.ok and refused.error is not None
    assert refused.error.code == "config.not_tunable" and "mqtt.port" in refused.error.message
    x, labels = samples()
    tensor = np.asarray(x[:2], np.float32)
    answer = client.request(
        "cl-b",
        "infer",
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(tensor.shape),
                     "data": tensor.reshape(-1).tolist()}]},
    )  # fmt: skip
    assert answer.ok, answer
    logits = np.asarray(answer.result["outputs"][0]["data"]).reshape(2, -1)
    assert list(logits.argmax(axis=1)) == list(labels[:2])
    logs = client.request("cl-a", "logs", {"lines": 5})
    assert logs.ok and 0 < len(logs.result["lines"]) <= 5


def test_a_console_key_the_device_does_not_trust_is_refused(client: FleetClient) -> None:
    other = FleetClient(client.config.replace(console_id="untrusted-1"),
                        key=Ed25519PrivateKey.generate())  # fmt: skip
    with other.connect():
        reply = other.request("cl-a", "ping")
    assert not reply.ok and reply.error is not None
    assert reply.error.code == "command.bad_signature"
    assert other.pending() == 0


def test_hundreds_of_concurrent_commands_each_get_their_reply(client: FleetClient) -> None:
    # 200 a device: under the agent's command queue (256), past which it drops a flood.
    n = 400
    futures = [client.submit(DEVICES[i % 2], "ping", timeout_s=60) for i in range(n)]
    done, not_done = wait(futures, timeout=90)
    assert not not_done
    replies = [f.result() for f in futures]
    assert all(r.ok for r in replies)
    assert len({r.id for r in replies}) == n  # one reply per command, none mixed up
    assert [r.device_id for r in replies] == [DEVICES[i % 2] for i in range(n)]
    assert client.pending() == 0


def test_no_reply_times_out_with_what_is_known(client: FleetClient) -> None:
    with pytest.raises(FleetError) as info:
        client.request("never-seen", "ping", timeout_s=0.3)
    assert info.value.code is FleetCode.TIMEOUT
    assert info.value.message == (
        "no reply from never-seen to ping within 0.3 s; it has not been seen on the broker"
    )
    assert client.pending() == 0
    # Bad targets and names never leave the console.
    for target, name in (("group", "ping"), ("a/b", "ping"), ("cl-a", "Ping")):
        with pytest.raises(FleetError) as info:
            client.request(target, name)
        assert info.value.code is FleetCode.BAD_INPUT


def test_mqtt_311_uses_reply_to(client: FleetClient, broker: Broker) -> None:
    config = client.config.replace(protocol="3.1.1", console_id="v311-console")
    seen: list[dict[str, Any]] = []
    with FleetClient(config, key=client._signing_key()) as old:
        old.on_sent = lambda body, target: seen.append(dict(body))
        reply = old.request("cl-b", "ping")
    assert reply.ok and reply.device_id == "cl-b"
    assert seen[0]["reply_to"] == "edgerun/v1/console/v311-console/reply"


def test_an_offline_device_is_refused_at_once_or_times_out_with_wait(
    client: FleetClient, fleet: dict[str, AgentProcess]
) -> None:
    """Last in the module: it kills cl-b (SIGKILL, so the broker sends its last will)."""
    view = FleetView(client).start()
    assert view.row("cl-b") is not None and view.row("cl-b").online  # type: ignore[union-attr]
    fleet["cl-b"].proc.kill()
    fleet["cl-b"].proc.wait()
    assert view.wait(lambda v: v.row("cl-b").online is False, 60)  # type: ignore[union-attr]
    future = client.submit("cl-b", "ping")
    assert future.done()  # refused before anything was sent
    with pytest.raises(FleetError) as info:
        future.result()
    assert info.value.code is FleetCode.OFFLINE
    assert "cl-b is offline since" in info.value.message
    assert "connection lost (last will)" in info.value.message
    with pytest.raises(FleetError) as info:
        client.request("cl-b", "ping", timeout_s=0.3, wait_offline=True)
    assert info.value.code is FleetCode.TIMEOUT
    assert "no reply from cl-b to ping within 0.3 s; it is offline since" in info.value.message
    assert client.pending() == 0
    view.close()


def test_a_lost_connection_fails_what_waits(tmp_path: Path) -> None:
    with Broker(tmp_path) as own:
        config = FleetConfig.load(None, broker=f"mqtt://{own.host}:{own.port}")
        client = FleetClient(config, key=Ed25519PrivateKey.generate()).connect()
        try:
            future = client.submit("ghost", "ping", timeout_s=60)
            own.kill()
            with pytest.raises(FleetError) as info:
                future.result(30)
            assert info.value.code is FleetCode.BROKER
            assert "was lost before ghost answered ping" in info.value.message
            assert client.pending() == 0
        finally:
            client.close()


def test_publishes_keep_their_order_beyond_the_send_window(broker: Broker) -> None:
    """More QoS 1 messages than paho is handed at once (SEND_WINDOW): they wait in the
    client, in order, and a waiting publish after them returns once all are acked."""
    config = FleetConfig.load(None, broker=f"mqtt://{broker.host}:{broker.port}")
    got: list[bytes] = []
    acks: list[object] = []
    n = SEND_WINDOW * 5
    with FleetClient(config) as sub, FleetClient(config) as pub:
        sub.subscribe("edgerun/v1/console/order/+", lambda m: got.append(m.payload), qos=1)
        for i in range(n):
            pub.publish(f"edgerun/v1/console/order/{i % 7}", b"%d" % i, wait=False,
                        on_ack=acks.append)  # fmt: skip
        pub.publish("edgerun/v1/console/order/last", b"last")  # waits for its PUBACK
        assert len(acks) == n and all(a is not None and not a.is_failure for a in acks)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while len(got) < n + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got == [b"%d" % i for i in range(n)] + [b"last"]


def test_a_broker_restart_restores_subscriptions(tmp_path: Path) -> None:
    with Broker(tmp_path) as own:
        config = FleetConfig.load(None, broker=f"mqtt://{own.host}:{own.port}")
        with FleetClient(config) as client, FleetClient(config.replace(console_id="p")) as pub:
            got: list[bytes] = []
            reconnects: list[int] = []
            client.subscribe("edgerun/v1/console/restart/+", lambda m: got.append(m.payload))
            client.add_connect_listener(lambda: reconnects.append(client.connections))
            own.kill()
            own.start()
            deadline = time.monotonic() + 30
            while not (client.connected and pub.connected) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.connected and pub.connected and reconnects == [2]
            pub.publish("edgerun/v1/console/restart/x", b"again")
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)
            assert got == [b"again"]  # subscribed again on the new connection


def test_an_unreachable_broker_is_named() -> None:
    port = free_port()
    config = FleetConfig.load(None, broker=f"mqtt://127.0.0.1:{port}")
    with pytest.raises(FleetError) as info:
        FleetClient(config).connect(timeout_s=2)
    assert info.value.code is FleetCode.BROKER
    assert info.value.message == (
        f"cannot reach the broker at 127.0.0.1:{port}: connection refused "
        "(is the broker running, on this port?)"
    )


def secure_config(secure: SecureBroker, tmp_path: Path, **keys: Any) -> FleetConfig:
    password = tmp_path / "pw"
    password.write_text(keys.pop("password", CONSOLE_PASSWORD) + "\n")
    values: dict[str, Any] = {
        "broker": secure.url,
        "username": secure.console_user,
        "password_file": str(password),
        "ca_file": str(secure.pki.ca_cert),
    }
    values.update(keys)
    return FleetConfig.load(None, **values)


def test_tls_passwords_and_acl(
    secure_broker: SecureBroker, tmp_path: Path, console_pub: Path, console_key: Ed25519PrivateKey
) -> None:
    # A real agent logs in as dev-1 (password, TLS); the ACL lets it answer on the
    # console's reply topic and read only its own commands.
    password = tmp_path / "dev-1.pw"
    password.write_text("pw-dev-1")
    mqtt_extra = (f'username = "dev-1"\npassword = "{password}"\n[mqtt.tls]\nenabled = true\n'
                  f'ca_file = "{secure_broker.pki.ca_cert}"\n')  # fmt: skip
    with (
        agents(tmp_path / "agents", secure_broker.broker, ["dev-1"], console_pub,
               host="localhost", mqtt_extra=mqtt_extra),
        FleetClient(secure_config(secure_broker, tmp_path), key=console_key) as client,
    ):  # fmt: skip
        client.publish("edgerun/v1/console/x/probe", b"{}")  # PUBACK awaited
        view = FleetView(client).start()
        assert view.wait(lambda v: (r := v.row("dev-1")) is not None and bool(r.online), 60)
        reply = client.request("dev-1", "ping")
        assert reply.ok and reply.device_id == "dev-1"
    with pytest.raises(FleetError) as info:
        FleetClient(secure_config(secure_broker, tmp_path, password="wrong")).connect()
    assert info.value.code is FleetCode.BROKER
    assert f"the broker at localhost:{secure_broker.broker.port} refused the connection" in (
        info.value.message
    )
    other_ca = tmp_path / "other"
    from tests.mqtt_broker import make_pki

    with pytest.raises(FleetError) as info:
        FleetClient(
            secure_config(secure_broker, tmp_path, ca_file=str(make_pki(other_ca).ca_cert))
        ).connect()
    assert "TLS certificate verification failed" in info.value.message
    # A device's credentials cannot read a console's replies: the ACL refuses them.
    with pytest.raises(FleetError) as info:
        FleetClient(
            secure_config(secure_broker, tmp_path, username="dev-1", password="pw-dev-1")
        ).connect(timeout_s=2.5)
    assert "does not deliver this console's reply topic" in info.value.message
    assert "(dev-1) read and write edgerun/v1/console/#" in info.value.message
