"""Subscriptions a broker refuses right after a connect are asked for again.

A loaded NATS refuses a QoS 1 SUBSCRIBE when making its JetStream consumer takes too
long; seen in a suite run as "refused the subscription(s) to .../reply" and a console
that could not connect. Here a real mosquitto's dynamic-security plugin refuses the
console's subscriptions; a log handler lifts the refusal (a real $CONTROL command to
the plugin, answered before the handler returns) when the client says it will ask
again, so the second SUBSCRIBE is granted. Left refused, the console reports it after
the retries, naming the topic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from fleet.config import FleetConfig
from fleet.errors import FleetError
from fleet.mqtt import RESUBSCRIBE_AFTER_S, FleetClient
from tests.mqtt_broker import Broker, dynsec_plugin

CONTROL = "$CONTROL/dynamic-security/v1"


ADMIN, ADMIN_PASSWORD = "dynsec-admin", "dynsec-admin-pw"


def refusing_config() -> dict[str, Any]:
    """mosquitto's dynamic-security plugin refusing every SUBSCRIBE by default (SUBACK
    0x87 in MQTT 5), plus a client allowed to send the plugin's $CONTROL commands (its
    password stored as the plugin stores it: PBKDF2-SHA512, base64). Changing the
    default access does not kick connected clients (changing a role they have would)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", ADMIN_PASSWORD.encode(), salt, 101)
    control = "$CONTROL/dynamic-security/#"
    role = {"rolename": "admin", "acls": [
        {"acltype": kind, "topic": control, "allow": True}
        for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")
    ]}  # fmt: skip
    admin = {"username": ADMIN, "password": base64.b64encode(digest).decode(),
             "salt": base64.b64encode(salt).decode(), "iterations": 101,
             "roles": [{"rolename": "admin"}]}  # fmt: skip
    return {
        "defaultACLAccess": {
            "publishClientSend": True,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [admin],
        "groups": [],
        "roles": [role],
    }


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if dynsec_plugin() is None:
        pytest.skip("mosquitto's dynamic security plugin is not installed")
    with Broker(tmp_path, dynsec=refusing_config()) as b:
        yield b


def _config(broker: Broker, key_file: Path) -> FleetConfig:
    return FleetConfig.load(
        None,
        broker=f"mqtt://{broker.host}:{broker.port}",
        key=str(key_file),
        operator="resubscribe-tester",
        console_id=f"resub-{uuid.uuid4().hex[:6]}",
        timeout_s=5,
        connect_timeout_s=10,
    )


def lift_refusal(broker: Broker) -> None:
    """Allow subscribing through the plugin's own control topic; returns once the
    plugin answered."""
    done = threading.Event()
    answers: list[Any] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"admin-{uuid.uuid4().hex}")
    client.username_pw_set(ADMIN, ADMIN_PASSWORD)

    def on_message(c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        answers.append(json.loads(msg.payload))
        done.set()

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(f"{CONTROL}/response", qos=1)
        assert subscribed.wait(10)
        command = {"command": "setDefaultACLAccess",
                   "acls": [{"acltype": "subscribe", "allow": True}]}  # fmt: skip
        client.publish(CONTROL, json.dumps({"commands": [command]}), qos=1).wait_for_publish(10)
        assert done.wait(10), "the dynamic-security plugin did not answer"
        assert "error" not in answers[0]["responses"][0], answers
    finally:
        client.loop_stop()
        client.disconnect()


class _LiftOnRetry(logging.Handler):
    def __init__(self, broker: Broker) -> None:
        super().__init__(logging.WARNING)
        self.broker = broker
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "asking again" in record.getMessage():
            self.retries += 1
            if self.retries == 1:
                lift_refusal(self.broker)  # before the retry is scheduled


def test_a_reply_topic_refused_once_is_asked_again_and_the_console_connects(
    broker: Broker, console_key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = _LiftOnRetry(broker)
    logger = logging.getLogger("fleet.mqtt")
    logger.addHandler(handler)
    try:
        with (
            caplog.at_level(logging.WARNING, "fleet.mqtt"),
            FleetClient(_config(broker, console_key_file)) as client,
        ):
            # connect() returned: the reply topic's SUBACK granted it, and the probe
            # message sent to it came back.
            assert client.connected
    finally:
        logger.removeHandler(handler)
    assert handler.retries == 1
    refusals = [r for r in caplog.records if "refused the subscription" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING  # never an error


def test_a_refusal_that_stands_is_reported_after_the_retries(
    broker: Broker, console_key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "fleet.mqtt"), pytest.raises(FleetError) as err:
        FleetClient(_config(broker, console_key_file)).connect()
    assert "refused the subscription to this console's reply topic" in err.value.message
    warnings = [r for r in caplog.records if "asking again" in r.getMessage()]
    assert len(warnings) == len(RESUBSCRIBE_AFTER_S)
    assert any(r.levelno == logging.ERROR for r in caplog.records)
