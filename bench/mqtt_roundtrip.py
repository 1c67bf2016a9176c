"""Command round trip on loopback: console publish -> signed `ping` -> reply received.

A real mosquitto on a free port, a real `edge-agent run` process with the sample
bundle and signatures required; the console signs every command (included in the
time, as a real console would). Prints p50/p90/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from _common import SAMPLE, agent_process, pct
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.canonical import sign_body
from agent.protocol.messages import dumps, loads
from agent.protocol.topics import DeviceTopics, console_reply
from tests.mqtt_broker import Broker

DEVICE = "edgerun-device"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--command", default="ping", choices=["ping", "status"])
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    with (
        tempfile.TemporaryDirectory(prefix="er-bench-mqtt-", dir="/tmp") as tmp,
        Broker(Path(tmp)) as broker,
    ):
        pub = Path(tmp) / "console.pub"
        pub.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
        extra = (
            f"[mqtt]\nenabled = true\nport = {broker.port}\n"
            f'[commands]\nconsole_keys = ["{pub}"]\n[telemetry]\ninterval_s = 1.0\n'
        )
        with agent_process(SAMPLE, extra=extra):
            reply_topic = str(console_reply("bench"))
            got = threading.Event()
            replies: list[bytes] = []
            client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id="bench-console", protocol=paho.MQTTv5
            )
            client.on_message = lambda c, u, m: (replies.append(m.payload), got.set())
            client.connect(broker.host, broker.port)
            # paho leaves Nagle on; a console that wants fast answers turns it off.
            client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
            client.subscribe(reply_topic, qos=1)
            client.loop_start()
            topic = str(DeviceTopics(DEVICE).command(args.command))
            # Wait for the device to be online (subscribed).
            deadline = time.monotonic() + 30
            times: list[float] = []
            warmup = 20
            i = 0
            while len(times) < args.count:
                got.clear()
                body = {"id": uuid.uuid4().hex, "name": args.command, "args": {},
                        "expires_at": time.time() + 30, "to": DEVICE}  # fmt: skip
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = reply_topic
                props.CorrelationData = body["id"].encode()
                start = time.perf_counter()
                client.publish(topic, dumps(sign_body(body, key)), qos=1, properties=props)
                if not got.wait(2.0):
                    if time.monotonic() > deadline:
                        raise SystemExit("no reply from the agent")
                    continue  # not online yet
                elapsed = time.perf_counter() - start
                reply = loads(replies[-1])
                assert reply["ok"], reply
                i += 1
                if i > warmup:
                    times.append(elapsed * 1000)
            client.loop_stop()
    print(f"command round trip ({args.command}, signed, MQTT v5, loopback), {len(times)} commands:")
    print(f"  p50 {pct(times, 50):.2f} ms  p90 {pct(times, 90):.2f} ms  "
          f"p99 {pct(times, 99):.2f} ms  max {max(times):.2f} ms   (target p99 < 20 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
