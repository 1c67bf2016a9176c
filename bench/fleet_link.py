"""The console's link at scale: how fast the view settles and `devices` lists, and how
fast thousands of concurrent commands are answered.

    python bench/fleet_link.py [--sizes 1000,10000] [--runs 3] [--commands 2500]

One local mosquitto; `edge-fleet simulate N` in its own process (so the simulated
devices do not share the console's interpreter and GIL), multiplexed on a few
connections. Per size, medians of `--runs`:

  - view settle: FleetView.start() until its marker came back behind every retained
    status and state (rows counted);
  - `edge-fleet --json devices`: a whole CLI process, start to exit (Python start-up,
    connect, settle, print N rows);
  - commands: `--commands` pings to as many distinct devices submitted at once (a rollout
    wave), until the last reply.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet.config import FleetConfig  # noqa: E402
from fleet.mqtt import FleetClient  # noqa: E402
from fleet.view import FleetView  # noqa: E402
from tests.mqtt_broker import Broker  # noqa: E402


def keys(directory: Path) -> tuple[Ed25519PrivateKey, Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = directory / "console.key", directory / "console.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return key, priv, pub


def start_sim(broker: Broker, n: int, pub: Path, log: Path) -> subprocess.Popen[bytes]:
    conns = max(1, min(50, n // 200))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "--broker", f"mqtt://{broker.host}:{broker.port}",
         "simulate", str(n), "--prefix", f"b{n}", "--connections", str(conns),
         "--telemetry-interval", "10", "--console-key", str(pub), "--skip-download"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip


def settle(config: FleetConfig, n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with FleetClient(config) as client:
        view = FleetView(client).start(settle_s=120)
        took = time.perf_counter() - t0
        rows = sum(1 for r in view.rows() if r.device_id.startswith(f"b{n}-"))
    return took, rows


def cli_devices(toml: Path, n: int) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "--config", str(toml), "--json", "devices",
         "--settle", "120"],
        check=True, capture_output=True, env=env, cwd=ROOT,
    )  # fmt: skip
    took = time.perf_counter() - t0
    return took, sum(1 for r in json.loads(proc.stdout) if r["device_id"].startswith(f"b{n}-"))


def commands(config: FleetConfig, key: Ed25519PrivateKey, n: int, count: int) -> tuple[float, int]:
    with FleetClient(config, key=key) as client:
        view = FleetView(client).start(settle_s=120)
        targets = sorted(r.device_id for r in view.rows() if r.device_id.startswith(f"b{n}-"))
        targets = targets[:count]
        t0 = time.perf_counter()
        futures = [client.submit(d, "ping", timeout_s=120) for d in targets]
        wait(futures, timeout=180)
        took = time.perf_counter() - t0
        ok = sum(1 for f in futures if f.done() and not f.exception() and f.result().ok)
        assert client.pending() == 0
    return took, ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--commands", type=int, default=2500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key, priv, pub = keys(tmp)
        with Broker(tmp) as broker:
            config = FleetConfig.load(None, broker=f"mqtt://{broker.host}:{broker.port}",
                                      key=str(priv))  # fmt: skip
            toml = tmp / "fleet.toml"
            toml.write_text(f'broker = "mqtt://{broker.host}:{broker.port}"\nkey = "{priv}"\n'
                            f'db = "{tmp / "fleet.db"}"\n')  # fmt: skip
            for n in (int(s) for s in args.sizes.split(",")):
                sim = start_sim(broker, n, pub, tmp / f"sim-{n}.log")
                try:
                    deadline = time.monotonic() + 300
                    while settle(config, n)[1] < n:
                        if time.monotonic() > deadline or sim.poll() is not None:
                            raise SystemExit(f"simulator did not bring {n} devices online:\n"
                                             + (tmp / f"sim-{n}.log").read_text()[-2000:])  # fmt: skip
                        time.sleep(1)
                    s = [settle(config, n) for _ in range(args.runs)]
                    c = [cli_devices(toml, n) for _ in range(args.runs)]
                    k = min(args.commands, n)
                    m = [commands(config, key, n, k) for _ in range(args.runs)]
                finally:
                    sim.terminate()
                    sim.wait(60)
                print(f"{n:>6} devices: view settle median {statistics.median(t for t, _ in s):.2f} s "
                      f"({min(r for _, r in s)} rows); `devices` process median "
                      f"{statistics.median(t for t, _ in c):.2f} s ({min(r for _, r in c)} rows); "
                      f"{k} concurrent pings median {statistics.median(t for t, _ in m):.2f} s "
                      f"({min(ok for _, ok in m)}/{k} ok)")  # fmt: skip
                # The next size has its own prefix; clear nothing (retained rows of the
                # previous size stay, as a real broker's would, and are not counted).


if __name__ == "__main__":
    main()
