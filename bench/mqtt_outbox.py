"""Telemetry through the on-disk outbox to a real mosquitto.

1. msgs/s the agent pushes through the outbox to the broker while connected (each
   message committed to SQLite before it is sent, deleted after its PUBACK);
2. catch-up after a 10-minute outage at a 1 s telemetry interval (600 messages);
3. drain time for 10,000 queued messages (target: under 10 s).

The device side is the agent's own Outbox, MqttClient and OutboxSender; the receiving
console is `mosquitto_sub` in its own process, which exits once it has them all.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)

from agent.link.client import ClientSettings, MqttClient
from agent.link.sender import OutboxSender
from agent.outbox import Outbox
from agent.protocol.topics import DeviceTopics
from tests.mqtt_broker import Broker

TOPIC = DeviceTopics("bench-device").telemetry


def telemetry(seq: int) -> bytes:
    """About the size of a real report (~1 KB)."""
    body = {
        "device_id": "bench-device", "seq": seq, "ts": time.time(), "interval_s": 1.0,
        "inference": {"interval": {"requests": 120, "errors": 0, "rate_per_s": 120.0,
                                   "p50_ms": 0.21, "p95_ms": 0.4, "p99_ms": 0.9},
                      "total": {"requests": 10**6, "items": 10**6, "errors": 3,
                                "p50_ms": 0.25, "p95_ms": 0.5, "p99_ms": 1.0}},
        "system": {"cpu_percent": 12.5, "rss_mb": 80.1, "available_mb": 900.0,
                   "load": [0.1, 0.2, 0.3], "temperatures_c": {"cpu-thermal": 48.2},
                   "disk_free_mb": 5000.0},
        "model": {"name": "digits", "version": "1.0.0", "sha256": "5" * 64,
                  "runtime": "onnxruntime"},
        "outbox": {"messages": 0, "bytes": 0, "dropped": {"telemetry": 0, "event": 0}},
        "pad": "x" * 300,
    }  # fmt: skip
    return json.dumps(body).encode()


class Device:
    def __init__(self, directory: Path, broker: Broker, synchronous: str) -> None:
        self.outbox = Outbox(directory / "outbox.sqlite", 2**30, 86400, synchronous)  # type: ignore[arg-type]
        self.client = MqttClient(ClientSettings(broker.host, broker.port, "bench-device",
                                                reconnect_min_s=0.05, reconnect_max_s=0.2))  # fmt: skip
        self.sender = OutboxSender(self.outbox, self.client, 32, lambda d: None)
        self.client._on_connect = self.sender.kick

    def put(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.outbox.put("telemetry", str(TOPIC), telemetry)
            self.sender.kick()
        return time.perf_counter() - start

    def start(self) -> None:
        self.sender.start()
        self.client.start()

    def wait_empty(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.outbox.depth().messages and time.monotonic() < deadline:
            time.sleep(0.005)

    def stop(self) -> None:
        self.sender.stop()
        self.client.stop()
        self.outbox.close()


def subscriber(broker: Broker, count: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", str(TOPIC),
         "-q", "1", "-C", str(count), "-i", f"bench-sub-{count}"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # subscribed
    return proc


def backlog(tmp: Path, count: int, synchronous: str) -> tuple[float, float]:
    """Queue `count` while offline, then time the drain from the device's (re)start.
    Returns (outbox empty s, all received s)."""
    directory = tmp / f"drain-{count}-{synchronous}"
    # Queue quickly (no fsync per row); the drain then runs with `synchronous`.
    filler = Outbox(directory / "outbox.sqlite", 2**30, 86400, "normal")
    for _ in range(count):
        filler.put("telemetry", str(TOPIC), telemetry)
    filler.close()
    with Broker(tmp) as broker:
        sub = subscriber(broker, count)
        device = Device(directory, broker, synchronous)
        start = time.perf_counter()
        device.start()
        device.wait_empty()
        empty = time.perf_counter() - start
        sub.wait(timeout=120)
        received = time.perf_counter() - start
        device.stop()
    return empty, received


def streaming(tmp: Path, count: int, synchronous: str) -> float:
    """Messages/s from put to all received, with the broker up all along."""
    with Broker(tmp) as broker:
        device = Device(tmp / f"stream-{synchronous}", broker, synchronous)
        device.start()
        assert device.client.wait_connected(10)
        sub = subscriber(broker, count)
        start = time.perf_counter()
        device.put(count)
        sub.wait(timeout=300)
        elapsed = time.perf_counter() - start
        device.stop()
    return count / elapsed


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="er-bench-outbox-", dir="/tmp") as tmp:
        t = Path(tmp)
        for sync in ("full", "normal"):
            rate = streaming(t, 3000, sync)
            print(f"telemetry through the outbox (synchronous={sync}): {rate:,.0f} msgs/s")
        empty, received = backlog(t, 600, "full")
        print(f"catch-up after a 10-minute outage at 1 s (600 queued): outbox empty after "
              f"{empty:.2f} s, all received after {received:.2f} s")  # fmt: skip
        empty, received = backlog(t, args.count, "full")
        print(f"{args.count:,} queued: outbox empty after {empty:.2f} s, all received after "
              f"{received:.2f} s (target < 10 s)")  # fmt: skip


if __name__ == "__main__":
    main()
