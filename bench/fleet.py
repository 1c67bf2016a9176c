"""The fleet console at scale, against simulated devices on one local mosquitto.

    python bench/fleet.py                       # 1,000 and 10,000 devices, rollout at 1,000
    python bench/fleet.py --sizes 1000 --runs 3 --rollout-sizes 1000

For each size: `edge-fleet simulate N` runs in its own process (one MQTT connection
per device up to 2,000, multiplexed above), then

- `edge-fleet --json devices` lists them: wall time (median of --runs), the console
  process's peak RSS and CPU seconds (from wait4), rows seen; target < 2 s at 10,000;
- a staged rollout (`edge-fleet deploy --to all --canary 1% --wave 25% --gate …`, real
  HTTP bundle downloads from the console's server up to 2,000 devices, skipped above):
  wall time end to end, its overhead
  beyond the soak times (target < 30 s at 1,000), the console's RSS and CPU, and
  the broker messages per device it caused (a counter client subscribed to `#`
  counts everything the broker routes during the rollout, by kind; telemetry is
  counted apart: it flows whether a rollout runs or not).

Figures go to stdout as a table and, with --json, as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from _common import DEMO_KEY, DEMO_PUB, ROOT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.messages import loads
from agent.protocol.topics import ROOT as TOPIC_ROOT
from tests.mqtt_broker import Broker

CLI = [sys.executable, "-m", "fleet.cli"]
MUX_ABOVE = 2000  # devices; above this the simulator multiplexes (one connection per 100)
# The example gates; every wave soaks (the engine soaks only when gates are set).
GATE = "p95_ms<=1.2x,error_rate<=0.01"


# --------------------------------------------------------------------------- counting


class Counter_:
    """A client on `#`: what the broker routes, by kind, and each device's last status."""

    def __init__(self, broker: Broker) -> None:
        self.counts: Counter[str] = Counter()
        self.online: dict[str, bool] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"count-{os.getpid()}",
                                  protocol=paho.MQTTv5)  # fmt: skip
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe("#", qos=0)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("counter could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        levels = msg.topic.split("/")
        if msg.topic.startswith("$"):
            return
        base = len(TOPIC_ROOT.split("/"))
        kind = "other"
        rest = levels[base:]
        if rest and rest[0] == "console":
            kind = "reply"
        elif rest and rest[0] == "group":
            kind = "group_command"
        elif len(rest) >= 2 and rest[1] == "cmd":
            kind = "command"
        elif len(rest) >= 2 and rest[1] == "bundle":
            kind = "need" if rest[-1] == "need" else "chunk"
        elif len(rest) == 2:
            kind = rest[1]
        with self.lock:
            self.counts[kind] += 1
            if kind == "status" and msg.payload:
                with contextlib.suppress(Exception):
                    self.online[rest[0]] = loads(bytes(msg.payload))["state"] == "online"

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)

    def wait_online(self, prefix: str, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                up = sum(1 for d, on in self.online.items() if on and d.startswith(prefix))
            if up >= n:
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------- processes


def timed(cmd: list[str], timeout_s: float = 900) -> tuple[float, int, float, float, str, str]:
    """Run `cmd`; (wall s, exit status, peak RSS MB, CPU s, stdout, stderr), from wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.01)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (wall, proc.returncode, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime,
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))  # fmt: skip


@contextlib.contextmanager
def simulator(
    broker: Broker, n: int, pub: Path, prefix: str, telemetry_s: float, latency_s: float
) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [*CLI, "--broker", f"mqtt://{broker.host}:{broker.port}", "simulate", str(n),
           "--prefix", prefix, "--console-key", str(pub), "--telemetry-interval",
           str(telemetry_s), "--phase-latency", str(latency_s), "--trial", "0.5",
           "--model", "digits:1.0.0", "--live-since-swap"]  # fmt: skip
    if n > MUX_ABOVE:
        # 10,000 real downloads of the sample through Python on 2 cores would measure
        # the HTTP server, not the console: devices skip the transfer (said in the output).
        cmd += ["--connections", str(max(1, n // 100)), "--skip-download"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_figures(pid: int, name: str) -> dict[str, float]:
    """RSS now and CPU seconds so far of a running process (from /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {f"{name}_rss_mb": round(rss / 1024, 1),
            f"{name}_cpu_s": round((int(fields[11]) + int(fields[12])) / ticks, 1)}  # fmt: skip


def rows_of(stdout: str) -> int:
    data = json.loads(stdout)
    rows = data["devices"] if isinstance(data, dict) else data
    return len(rows)


# --------------------------------------------------------------------------- one size


def bench_size(
    work: Path,
    n: int,
    runs: int,
    rollout: bool,
    soak_s: float,
    key: Path,
    pub: Path,
    telemetry: float | None = None,
    via: str = "http",
) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": n}
    prefix = f"b{n}"
    # A gate needs the new model's live figures inside the soak: enough requests
    # (gate_min_requests 10 at 5-50 requests/s: 2 s) and then a telemetry report, so
    # the soak is at least 2 telemetry intervals + 2 s (6 s at 1,000, 22 s at 10,000).
    telemetry_s = telemetry or (2.0 if n <= 2000 else 10.0)
    soak_s = max(soak_s, 2 * telemetry_s + 2)
    out["telemetry_interval_s"] = telemetry_s
    with (
        Broker(work / f"broker-{n}") as broker,
        simulator(broker, n, pub, prefix, telemetry_s, latency_s=0.1) as sim,
    ):
        counter = Counter_(broker)
        try:
            started = time.monotonic()
            if not counter.wait_online(prefix, n, max(60.0, n / 50)):
                err = sim.stderr.read1().decode() if sim.stderr else ""  # type: ignore[attr-defined]
                raise RuntimeError(f"only {sum(counter.online.values())} of {n} online: {err}")
            out["simulator_online_s"] = round(time.monotonic() - started, 2)
            base = [*CLI, "--broker", f"mqtt://{broker.host}:{broker.port}", "--key", str(key),
                    "--db", str(work / f"fleet-{n}.db")]  # fmt: skip
            walls, rss, cpu = [], [], []
            for _ in range(runs):
                wall, rc, peak, cpu_s, stdout, stderr = timed([*base, "--json", "devices"])
                if rc != 0:
                    raise RuntimeError(f"devices failed: {stderr[-2000:]}")
                seen = rows_of(stdout)
                walls.append(wall)
                rss.append(peak)
                cpu.append(cpu_s)
            out["devices_rows"] = seen
            out["devices_s_median"] = round(statistics.median(walls), 3)
            out["devices_s_all"] = [round(w, 3) for w in walls]
            out["devices_rss_mb"] = round(statistics.median(rss), 1)
            out["devices_cpu_s"] = round(statistics.median(cpu), 3)
            if rollout:
                out.update(bench_rollout(work, n, base, counter, soak_s, via))
            out.update(process_figures(sim.pid, "simulator"))
        finally:
            counter.close()
    return out


def bench_rollout(
    work: Path, n: int, base: list[str], counter: Counter_, soak_s: float, via: str = "http"
) -> dict[str, Any]:
    from agent.signing import load_private_key
    from tests.helpers import make_bundle, unpack_sample

    bundle = work / "digits-2.0.0.edgebundle"
    if not bundle.exists():
        make_bundle(unpack_sample(work / "sample"), bundle, load_private_key(DEMO_KEY),
                    version="2.0.0")  # fmt: skip
    before = counter.snapshot()
    cmd = [*base, "deploy", str(bundle), "--to", "all", "--canary", "1%", "--wave", "25%",
           "--soak", str(soak_s), "--trial-window", "0.5", "--device-timeout", "300",
           "--via", via, "--trust", str(DEMO_PUB), "--http-host", "127.0.0.1",
           "--gate", GATE]  # fmt: skip
    wall, rc, peak, cpu_s, stdout, stderr = timed(cmd, timeout_s=1800)
    log = Path(tempfile.gettempdir()) / f"bench-fleet-deploy-{n}.log"
    log.write_text(stdout + stderr)  # the whole progress, for a rollout that did not succeed
    time.sleep(1.0)  # the last replies and events still in flight reach the counter
    after = counter.snapshot()
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
    waves = 1 + -(-(n - max(1, n // 100)) // max(1, n // 4))  # canary + ceil(rest / 25%)
    telemetry = delta.pop("telemetry", 0)
    per_device = {k: round(v / n, 2) for k, v in sorted(delta.items())}
    return {
        "rollout_exit": rc,
        "rollout_downloads": "skipped" if n > MUX_ABOVE else via,
        "rollout_gate": GATE,
        "rollout_s": round(wall, 2),
        "rollout_waves": waves,
        "rollout_soak_s": soak_s * waves,
        "rollout_overhead_s": round(wall - soak_s * waves, 2),
        "rollout_console_rss_mb": round(peak, 1),
        "rollout_console_cpu_s": round(cpu_s, 2),
        "rollout_messages_per_device": round(sum(delta.values()) / n, 2),
        "rollout_messages_by_kind_per_device": per_device,
        "rollout_telemetry_during": telemetry,
        "rollout_tail": (stdout + stderr)[-600:] if rc != 0 else "",
        "rollout_log": str(log),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--rollout-sizes", default="1000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--soak", type=float, default=3.0, help="soak seconds per wave (at least)")
    ap.add_argument("--telemetry", type=float, default=None, help="device telemetry interval s")
    ap.add_argument("--via", choices=("http", "mqtt"), default="http", help="bundle transport")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rollout_sizes = {int(s) for s in args.rollout_sizes.split(",") if s}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        key = work / "console.key"
        pk = Ed25519PrivateKey.generate()
        key.write_bytes(pk.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))  # fmt: skip
        key.chmod(0o600)
        pub = work / "console.pub"
        pub.write_bytes(pk.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
        for n in sizes:
            r = bench_size(
                work,
                n,
                args.runs,
                n in rollout_sizes,
                args.soak,
                key,
                pub,
                args.telemetry,
                args.via,
            )
            results.append(r)
            print(f"-- {n} devices: {json.dumps(r)}", file=sys.stderr, flush=True)
    print(f"{'devices':>8} {'devices --json':>15} {'RSS MB':>7} {'CPU s':>6} "
          f"{'rollout s':>10} {'overhead s':>11} {'msgs/device':>12}")  # fmt: skip
    for r in results:
        print(f"{r['devices']:>8} {r['devices_s_median']:>13.3f} s {r['devices_rss_mb']:>7.1f} "
              f"{r['devices_cpu_s']:>6.2f} {r.get('rollout_s', float('nan')):>10.2f} "
              f"{r.get('rollout_overhead_s', float('nan')):>11.2f} "
              f"{r.get('rollout_messages_per_device', float('nan')):>12.2f}")  # fmt: skip
    print("targets: devices --json < 2 s at 10,000; rollout overhead beyond soak < 30 s at 1,000")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
