"""Memory under concurrent big batches (issue 7, section 3): RSS peak against the cap,
and the time from the end of the burst until a good request succeeds again.

Default config but `memory.max_mb`; the model is tests/memory_model.py's "wide"
(~0.7 MB of activations a row); 8 clients each send `--requests` binary batches of
128 rows (4.9 MB) at once. RSS of the agent is sampled every 2 ms with psutil. Each
figure is the median over `--runs` fresh agents.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
from _common import DEMO_KEY, agent_process

from agent.api.client import ApiClient, ApiError
from agent.signing import load_private_key
from tests.memory_model import make_wide_bundle, rows

MB = 2**20


def one_run(bundle: Path, cap_mb: int, clients: int, requests: int) -> dict[str, float]:
    extra = f"[memory]\nmax_mb = {cap_mb}\n"
    with agent_process(bundle, extra=extra) as (proc, sock, _):
        process = psutil.Process(proc.pid)
        idle = process.memory_info().rss
        peak = idle
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, process.memory_info().rss)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        batch = rows(128)
        codes: Counter[str] = Counter()
        lock = threading.Lock()
        start = threading.Barrier(clients)

        def client() -> None:
            with ApiClient(str(sock), timeout=120) as c:
                start.wait()
                for _ in range(requests):
                    try:
                        c.infer("wide", {"input": batch}, binary=True)
                        code = "ok"
                    except ApiError as exc:
                        code = exc.code
                    with lock:
                        codes[code] += 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ended = time.perf_counter()
        small = rows(8)
        with ApiClient(str(sock), timeout=120) as c:
            while True:
                try:
                    c.infer("wide", {"input": small}, binary=True)
                    break
                except ApiError:
                    if time.perf_counter() - ended > 120:
                        raise SystemExit("the agent did not recover within 120 s") from None
                    time.sleep(0.01)
        recovered = time.perf_counter() - ended
        after = process.memory_info().rss
        stop.set()
        sampler.join()
    return {
        "idle_mb": idle / MB,
        "peak_mb": peak / MB,
        "after_mb": after / MB,
        "burst_s": ended - began,
        "recover_s": recovered,
        "ok": codes["ok"],
        "overloaded": codes["overloaded"],
        "other": sum(v for k, v in codes.items() if k not in ("ok", "overloaded")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="batches per client")
    parser.add_argument("--cap", type=int, nargs="*", default=[320, 512], help="memory.max_mb")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="er-bench-mem-", dir="/tmp") as tmp:
        bundle = make_wide_bundle(Path(tmp), load_private_key(DEMO_KEY))
        print(
            f"{args.clients} clients x {args.requests} binary batches of 128 rows (4.9 MB), "
            f"median of {args.runs} fresh agents"
        )
        print(
            f"  {'cap MB':>7} {'idle MB':>8} {'peak MB':>8} {'peak/cap':>9} {'after MB':>9} "
            f"{'burst s':>8} {'recover s':>10} {'ok':>4} {'503':>4} {'other':>6}"
        )
        for cap in args.cap:
            runs = [one_run(bundle, cap, args.clients, args.requests) for _ in range(args.runs)]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            print(
                f"  {cap:>7} {med('idle_mb'):>8.1f} {med('peak_mb'):>8.1f} "
                f"{med('peak_mb') / cap:>9.2f} {med('after_mb'):>9.1f} {med('burst_s'):>8.2f} "
                f"{med('recover_s'):>10.3f} {med('ok'):>4.0f} {med('overloaded'):>4.0f} "
                f"{med('other'):>6.0f}"
            )


if __name__ == "__main__":
    main()
