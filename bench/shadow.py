"""Shadow evaluation's cost to live latency.

The sample model served through `ModelHost.infer` (in process: this measures the
serving path, not the socket) from several client threads, with shadow evaluation
off, then on at each sample share (the candidate: the same model in a second
runtime, duty cycle 0.25 of one core). Rounds interleave the modes so drift of a
shared machine falls on all of them; prints the median over rounds of the clients'
p50/p95 and the ratio to "off".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import DEMO_PUB, SAMPLE, pct

from agent.config.loader import parse_config
from agent.protocol.update import ShadowSpec
from agent.service import Agent
from agent.update.shadow import ShadowEvaluator


def clients_run(agent: Agent, images: np.ndarray, clients: int, per_client: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = []
        for _ in range(per_client):
            i = int(rng.integers(len(images)))
            start = time.perf_counter()
            agent.host.infer("digits", {"input": images[i : i + 1]})
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1500, help="per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duty", type=float, default=0.25)
    parser.add_argument("--samples", default="0.2,1.0", help="sample shares to measure")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    with tempfile.TemporaryDirectory(prefix="er-shadow-", dir="/tmp") as tmp:
        config = parse_config(
            {
                "state_dir": str(Path(tmp) / "state"),
                "trust": {"public_keys": [str(DEMO_PUB)]},
                "api": {"socket": str(Path(tmp) / "api.sock")},
            },
            {},
        )
        agent = Agent(config)
        agent.admission.install(SAMPLE)
        served = agent.host.model
        assert served is not None
        candidate = agent.admission.open(served.directory, served.sha256, served.manifest)
        shadow = ShadowEvaluator(agent.host)
        modes: list[float | None] = [None] + [float(s) for s in args.samples.split(",")]
        p50s: dict[float | None, list[float]] = {m: [] for m in modes}
        p95s: dict[float | None, list[float]] = {m: [] for m in modes}
        compared: dict[float | None, list[float]] = {m: [] for m in modes}
        clients_run(agent, images, args.clients, 200)  # warm-up
        for _ in range(args.rounds):
            for mode in modes:
                cancel = threading.Event()
                worker = None
                result: list[dict[str, float]] = []
                if mode is not None:
                    spec = ShadowSpec(
                        sample=mode, duty_cycle=args.duty, min_requests=10**6, timeout_s=3600
                    )
                    worker = threading.Thread(
                        target=lambda s=spec, c=cancel, r=result: r.append(
                            shadow.evaluate(candidate, s, c, lambda f: None).figures
                        )
                    )
                    worker.start()
                    time.sleep(0.05)  # the observer is registered
                lat = clients_run(agent, images, args.clients, args.requests)
                if worker is not None:
                    cancel.set()
                    worker.join()
                    compared[mode].append(result[0]["compared"] / result[0]["offered"])
                p50s[mode].append(pct(lat, 50))
                p95s[mode].append(pct(lat, 95))
        base50, base95 = statistics.median(p50s[None]), statistics.median(p95s[None])
        print(
            f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds, "
            f"duty_cycle {args.duty}; medians over rounds (ms)"
        )
        print(f"{'shadow':>12} {'p50':>8} {'p95':>8} {'p50 x':>7} {'p95 x':>7} {'compared':>9}")
        for mode in modes:
            m50, m95 = statistics.median(p50s[mode]), statistics.median(p95s[mode])
            name = "off" if mode is None else f"sample {mode:g}"
            share = "" if mode is None else f"{statistics.median(compared[mode]):.1%}"
            print(
                f"{name:>12} {m50:8.3f} {m95:8.3f} {m50 / base50:7.2f} {m95 / base95:7.2f} "
                f"{share:>9}"
            )
        candidate.runtime.close()
        agent.host.close()


if __name__ == "__main__":
    main()
