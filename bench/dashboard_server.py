"""The dashboard server at scale: its RSS, `/api/devices` latency and the time from a
device's telemetry to the SSE event that carries it.

    python bench/dashboard_server.py [--sizes 1000,10000] [--requests 30] [--probes 20]

Per size, on a mosquitto of its own: `edge-fleet simulate N` in its own process
(telemetry every 10 s, multiplexed connections), and the real `edge-fleet serve`
process (SQLite record, telemetry retention on). Once every device is listed and a
full telemetry interval has passed:

  - RSS: the serve process's VmRSS, median of 5 readings over 5 s, and its CPU share
    over that time (it parses every report and writes them to the store);
  - `/api/devices` latency: `--requests` GETs of the first page (limit=100) in the id
    order, sorted by p95 highest first, and with a search, one connection each
    (what a page load does); median and p90;
  - telemetry to SSE: a probe device publishes its status, then `--probes` telemetry
    reports 0.2-0.6 s apart (random), each with a p95 of its own; the time from each publish to the
    `devices` event on `/api/live` that carries that figure (median, p90, max). The
    hub coalesces to at most one event per 250 ms, so 0-250 ms of it is by design.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.protocol.messages import Status, TelemetryMessage, dumps  # noqa: E402
from agent.protocol.topics import DeviceTopics  # noqa: E402
from bench.fleet_link import keys, start_sim  # noqa: E402
from tests.mqtt_broker import Broker, free_port  # noqa: E402

PROBE = "probe-1"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(port: int, path: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return time.perf_counter() - t0, body


def start_serve(
    broker: Broker, priv: Path, db: Path, port: int, log: Path
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "--json", "--broker",
         f"mqtt://{broker.host}:{broker.port}", "--db", str(db), "--key", str(priv),
         "serve", "--listen", f"127.0.0.1:{port}", "--settle", "120"],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env, cwd=ROOT,
    )  # fmt: skip


class Probe:
    """A device of the bench's own on the broker, and an SSE reader timing its rows."""

    def __init__(self, broker: Broker, port: int) -> None:
        self.topics = DeviceTopics(PROBE)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-probe")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.arrived: dict[float, float] = {}  # p95 marker -> perf_counter at arrival
        self._cond = threading.Condition()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.conn.request("GET", "/api/live")
        self.response = self.conn.getresponse()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event = ""
        try:
            for raw in self.response.fp:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "devices":
                    now = time.perf_counter()
                    for row in json.loads(line[5:])["rows"]:
                        if row["device_id"] == PROBE and row["p95_ms"] is not None:
                            with self._cond:
                                self.arrived.setdefault(row["p95_ms"], now)
                                self._cond.notify_all()
        except (OSError, ValueError):
            pass

    def online(self) -> None:
        status = Status(PROBE, "online", "bench", time.time(), "connected")
        self.client.publish(
            str(self.topics.status), dumps(status.to_json()), 1, True
        ).wait_for_publish()

    def telemetry(self, seq: int, p95: float) -> float:
        msg = TelemetryMessage(
            PROBE, seq, time.time(), 10.0,
            {"interval": {"requests": 100, "errors": 0, "p95_ms": p95, "rate_per_s": 10.0}},
            {"rss_mb": 50.0, "temperatures_c": {"cpu": 40.0}}, None, {"messages": 0},
        )  # fmt: skip
        t0 = time.perf_counter()
        # QoS 0 as the view subscribes telemetry; TCP_NODELAY is paho's default.
        self.client.publish(str(self.topics.telemetry), dumps(msg.to_json()), 0)
        return t0

    def wait(self, p95: float, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while p95 not in self.arrived:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.arrived[p95]

    def close(self) -> None:
        self.client.publish(str(self.topics.status), b"", 1, True).wait_for_publish()
        self.client.loop_stop()
        self.client.disconnect()
        self.conn.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_size(tmp: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    _, priv, pub = keys(tmp)
    with Broker(tmp / f"broker-{n}") as broker:
        sim = start_sim(broker, n, pub, tmp / f"sim-{n}.log")
        port = free_port()
        serve = None
        try:
            t0 = time.monotonic()
            serve = start_serve(broker, priv, tmp / f"fleet-{n}.db", port, tmp / f"serve-{n}.log")
            assert serve.stdout is not None
            started = json.loads(serve.stdout.readline() or "{}")
            if "url" not in started:
                raise SystemExit((tmp / f"serve-{n}.log").read_text()[-3000:])
            while get(port, "/api/devices?limit=1")[1]["total"] < n:
                if time.monotonic() - t0 > 300 or sim.poll() is not None:
                    raise SystemExit((tmp / f"sim-{n}.log").read_text()[-2000:])
                time.sleep(0.5)
            listed_s = time.monotonic() - t0
            time.sleep(11)  # a whole telemetry interval: every device reported once
            rss, c0, w0 = [], cpu_s(serve.pid), time.monotonic()
            for _ in range(5):
                rss.append(rss_mb(serve.pid))
                time.sleep(1)
            cpu_share = (cpu_s(serve.pid) - c0) / (time.monotonic() - w0)
            lat: dict[str, list[float]] = {}
            for name, path in (
                ("first page", "/api/devices?limit=100"),
                ("by p95 desc", "/api/devices?limit=100&sort=p95_ms&desc=1"),
                ("search", f"/api/devices?limit=100&q=b{n}-00"),
            ):
                lat[name] = [get(port, path)[0] * 1000 for _ in range(args.requests)]
            probe = Probe(broker, port)
            try:
                probe.online()
                seen: list[float] = []
                rng = random.Random(n)
                for i in range(args.probes):
                    marker = 1000.0 + i
                    t_pub = probe.telemetry(i + 1, marker)
                    t_got = probe.wait(marker, 10)
                    if t_got is not None:
                        seen.append((t_got - t_pub) * 1000)
                    # Random gaps: a fixed one locks onto the hub's 250 ms rhythm.
                    time.sleep(rng.uniform(0.2, 0.6))
            finally:
                probe.close()
        finally:
            if serve is not None:
                serve.terminate()
                serve.wait(60)
            sim.terminate()
            sim.wait(60)
    return {"devices": n, "listed_s": listed_s, "rss_mb": statistics.median(rss),
            "cpu_share": cpu_share, "latency_ms": lat, "sse_ms": seen,
            "sse_lost": args.probes - len(seen)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as name:
        for n in (int(s) for s in args.sizes.split(",")):
            r = bench_size(Path(name), n, args)
            if args.json:
                print(json.dumps(r))
                continue
            lat = "; ".join(
                f"{k} median {statistics.median(v):.1f} / p90 {pct(v, 90):.1f} ms"
                for k, v in r["latency_ms"].items()
            )
            sse = r["sse_ms"]
            sse_text = (f"median {statistics.median(sse):.0f} / p90 {pct(sse, 90):.0f} / "
                        f"max {max(sse):.0f} ms" if sse else "none arrived")  # fmt: skip
            print(f"{n:>6} devices: listed after {r['listed_s']:.1f} s; serve RSS "
                  f"{r['rss_mb']:.0f} MB, CPU {100 * r['cpu_share']:.0f}% of a core; "
                  f"/api/devices {lat}; telemetry -> SSE {sse_text}"
                  f" ({r['sse_lost']} lost)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
