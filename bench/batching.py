"""Throughput with and without dynamic micro-batching, concurrent batch-1 clients.

Same model, same clients, agent restarted with `batching.enabled` off then on.
Prints requests/s, p50/p99 latency and the mean rows per runtime call.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import agent_process, package_mlp, pct

from agent.api.client import ApiClient


def run(sock: Path, clients: int, per_client: int, x: np.ndarray) -> tuple[float, list[float], str]:
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = []
        with ApiClient(str(sock)) as c:
            for _ in range(per_client):
                s = time.perf_counter()
                c.infer("mlp", {"input": x}, binary=True)
                mine.append((time.perf_counter() - s) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    with ApiClient(str(sock)) as c:
        metrics = c.metrics()
    return clients * per_client / elapsed, latencies, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help="per client")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="er-batch-") as tmp:
        bundle = package_mlp(Path(tmp))
        print(f"{args.clients} clients x {args.requests} batch-1 requests, ~1 ms MLP, Unix socket")
        print(f"  {'batching':28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/call':>10}")
        for label, extra in (
            ("off", ""),
            (
                "on (max 32, wait 2 ms)",
                "[batching]\nenabled = true\nmax_batch = 32\nmax_wait_ms = 2\n",
            ),
        ):
            with agent_process(bundle, extra=extra, api="max_inflight = 256") as (
                _,
                sock,
                _ready,
            ):
                run(sock, 2, 10, x)  # warm up
                rate, lat, metrics = run(sock, args.clients, args.requests, x)
            lines = dict(m.rsplit(" ", 1) for m in metrics.splitlines() if not m.startswith("#"))
            calls = float(lines["edgerun_runtime_batch_size_count"])
            rows = float(lines["edgerun_runtime_batch_size_sum"])
            print(
                f"  {label:28} {rate:8.1f} {pct(lat, 50):8.2f} {pct(lat, 99):8.2f} "
                f"{rows / calls:10.2f}"
            )


if __name__ == "__main__":
    main()
