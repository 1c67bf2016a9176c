"""The console on a 3-node NATS cluster against one mosquitto: what clustering costs.

Simulated devices (fleet/simulate/, MQTT 3.1.1) connect to node 1, the console
(FleetClient, FleetView) to node 2; the same on one local mosquitto for comparison.
Prints, for each broker: the time for N devices to come online and appear in the
view, and the signed `ping` round trip (console -> device -> console) p50/p90/max.

    python bench/nats_cluster.py --devices 20 --pings 200
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.config import FleetConfig
from fleet.mqtt import FleetClient
from fleet.simulate import Simulator
from fleet.view import FleetView
from tests.mqtt_broker import Broker
from tests.nats_cluster import NatsCluster


@contextlib.contextmanager
def endpoints(kind: str, tmp: Path) -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """(device side, console side) addresses."""
    if kind == "nats":
        with NatsCluster(tmp) as cluster:
            yield cluster.nodes[0].address, cluster.nodes[1].address
    else:
        with Broker(tmp) as broker:
            yield broker.address, broker.address


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(kind: str, devices: int, pings: int, tmp: Path) -> None:
    key = Ed25519PrivateKey.generate()
    key_file, pub_file = tmp / "console.key", tmp / "console.pub"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    key_file.chmod(0o600)
    pub_file.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    with endpoints(kind, tmp) as (device_side, console_side):
        config = FleetConfig.load(None, broker=f"mqtt://{console_side[0]}:{console_side[1]}",
                                  protocol="3.1.1", key=str(key_file), operator="bench",
                                  console_id=f"bench-{uuid.uuid4().hex[:6]}", timeout_s=10,
                                  connect_timeout_s=30)  # fmt: skip
        client = FleetClient(config).connect()
        view = FleetView(client).start(settle_s=1)
        started = time.monotonic()
        with Simulator(*device_side, devices, prefix="b", console_keys=[pub_file],
                       protocol="3.1.1", telemetry_interval_s=1.0, start_timeout_s=300) as sim:  # fmt: skip
            ids = set(sim.device_ids)
            assert view.wait(lambda v: all((r := v.row(d)) is not None and r.online for d in ids),
                             300)  # fmt: skip
            online_s = time.monotonic() - started
            target = sorted(ids)[0]
            times = []
            for _ in range(pings):
                t0 = time.perf_counter()
                reply = client.request(target, "ping", timeout_s=10)
                times.append((time.perf_counter() - t0) * 1000)
                assert reply.ok, reply
        view.close()
        client.close()
    print(f"{kind:9} devices={devices} online+listed {online_s:6.2f} s "
          f"({online_s / devices * 1000:.0f} ms/device)  ping p50 {statistics.median(times):.2f} ms "
          f"p90 {pct(times, 0.9):.2f} ms max {max(times):.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--pings", type=int, default=200)
    args = parser.parse_args()
    for kind in ("mosquitto", "nats"):
        with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
            run(kind, args.devices, args.pings, Path(tmp))


if __name__ == "__main__":
    main()
