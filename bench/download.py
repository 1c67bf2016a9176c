"""Download throughput of the update fetchers (issue 8, Fetch).

Over loopback, median of a few runs each:

1. HTTP without a cap, and with `update.max_kbps` (the measured rate must sit at or
   under the cap);
2. HTTP through the poor-link proxy (tests/poorlink.py): throttled, delayed and cut
   every ~N bytes, resumed with Range to the right sha256;
3. an MQTT chunk transfer through a real mosquitto (the agent's own client and
   adapter, the console's ChunkSender), with and without a lossy sender.

    python bench/download.py [--size-mb 8] [--runs 3] [--kbps 16000]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)

from agent.protocol.update import DeployRequest
from agent.update.fetch import HttpFetcher, HttpSettings, MqttFetcher, MqttSettings
from fleet.transfer import ChunkSender
from tests.agent.update.fetch.httpserver import HttpServer, Route
from tests.agent.update.fetch.mqttside import DEVICE, Console, Device
from tests.mqtt_broker import Broker
from tests.poorlink import PoorLink


def payload(size: int) -> bytes:
    block = hashlib.sha256(b"bench").digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def http_request(url: str, data: bytes) -> DeployRequest:
    return DeployRequest.from_args({"url": url, "sha256": hashlib.sha256(data).hexdigest(),
                                    "size": len(data), "version": "2.0.0"})  # fmt: skip


def timed(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def report(label: str, size: int, median_s: float, note: str = "") -> None:
    mbit = size * 8 / median_s / 1e6
    print(f"{label:44s} {median_s:8.3f} s  {mbit:9.1f} Mbit/s  {note}")


def bench_http(work: Path, data: bytes, runs: int, kbps: float) -> None:
    with HttpServer(work, {"/b": Route(data)}) as srv:
        n = [0]

        def once(settings: HttpSettings, port: int | None = None) -> Callable[[], object]:
            def go() -> object:
                n[0] += 1
                return HttpFetcher(settings).fetch(
                    http_request(srv.url("/b", port=port), data), work / f"{n[0]}.part",
                    lambda d, t: None, threading.Event(),
                )  # fmt: skip

            return go

        med, _ = timed(once(HttpSettings()), runs)
        report("http, no cap", len(data), med)
        med, _ = timed(once(HttpSettings(max_kbps=kbps)), runs)
        report(f"http, max_kbps = {kbps:g}", len(data), med,
               f"(cap-implied minimum {len(data) * 8 / (kbps * 1000):.3f} s)")  # fmt: skip
        rate = 4_000_000.0
        with PoorLink(("127.0.0.1", srv.port), rate_bytes_s=rate, delay_s=0.001,
                      cut_every=len(data) // 4, seed=3) as link:  # fmt: skip
            settings = HttpSettings(max_retries=20, backoff_min_s=0.05, backoff_max_s=0.2)
            med, _ = timed(once(settings, link.port), runs)
            report(f"http, poor link {rate / 1e6:g} MB/s, cut ~every {len(data) // 4 >> 10} KiB",
                   len(data), med, f"({link.cuts} cuts over {runs} runs)")  # fmt: skip


def bench_mqtt(work: Path, data: bytes, runs: int) -> None:
    with Broker(work) as broker, Device(broker) as device:
        console = Console(broker)
        n = [0]

        def once(skip: Callable[[int, int], bool] | None) -> Callable[[], object]:
            def go() -> object:
                n[0] += 1
                tid = f"t{n[0]}"
                sender = console.add(ChunkSender(console.client, DEVICE, tid, data, skip=skip))
                req = DeployRequest.from_args({"transfer": tid, "sha256": sender.sha256,
                                               "size": len(data), "version": "2.0.0"})  # fmt: skip
                try:
                    return MqttFetcher(device.transfers, MqttSettings(0.5, 600)).fetch(
                        req, work / f"{tid}.part", lambda d, t: None, threading.Event()
                    )
                finally:
                    sender.stop()
                    console.senders.remove(sender)

            return go

        med, _ = timed(once(None), runs)
        report("mqtt chunks (32 KiB), lossless", len(data), med)
        med, _ = timed(once(lambda i, before: i % 7 == 0 and before == 0), runs)
        report(
            "mqtt chunks, every 7th lost once",
            len(data),
            med,
            "(asked again at the end of each round)",
        )
        console.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kbps", type=float, default=16_000.0, help="cap for the capped run")
    args = parser.parse_args()
    data = payload(int(args.size_mb * 1024 * 1024))
    print(f"bundle {len(data) / 1e6:.1f} MB, median of {args.runs} runs")
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        bench_http(Path(tmp) / "http", data, args.runs, args.kbps)
        bench_mqtt(Path(tmp) / "mqtt", data, args.runs)


if __name__ == "__main__":
    main()
