"""Memory under concurrent big batches (issue 7, section 3): RSS peak against the cap,
and the time from the end of the burst until a good request succeeds again.

Default config but `memory.max_mb`. `--model wide` (default): tests/memory_model.py's
"wide" model (~0.7 MB of activations a row), batches of 128 rows (4.9 MB).
`--model digits`: the shipped sample, batches of 19,140 rows (4.9 MB), the outside
test's own scenario (cap 160 MB). 8 clients each send `--requests` binary batches at
once. RSS of the agent is sampled every 2 ms with psutil. Each figure is the median
over `--runs` fresh agents; the answer codes are summed over the runs.
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

import numpy as np
import psutil
from _common import DEMO_KEY, SAMPLE, agent_process

from agent.api.client import ApiClient, ApiError
from agent.signing import load_private_key
from tests.memory_model import make_wide_bundle, rows

MB = 2**20


MODELS = {  # name: (rows a batch, rows of the good request after the burst)
    "wide": (128, 8),
    "digits": (19_140, 8),  # 19,140 x 1 x 8 x 8 float32 = 4.9 MB
}


def batch_of(model: str, n: int) -> np.ndarray:
    if model == "wide":
        return rows(n)
    rng = np.random.default_rng(n)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32)


def one_run(
    bundle: Path, model: str, cap_mb: int, clients: int, requests: int, max_batch: int
) -> tuple[dict[str, float], Counter[str]]:
    extra = f"[memory]\nmax_mb = {cap_mb}\n"
    api = f"max_batch_size = {max_batch}" if max_batch else ""
    with agent_process(bundle, extra=extra, api=api) as (proc, sock, _):
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
        batch = batch_of(model, MODELS[model][0])
        codes: Counter[str] = Counter()
        lock = threading.Lock()
        start = threading.Barrier(clients)

        def client() -> None:
            with ApiClient(str(sock), timeout=120) as c:
                start.wait()
                for _ in range(requests):
                    try:
                        c.infer(model, {"input": batch}, binary=True)
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
        small = batch_of(model, MODELS[model][1])
        with ApiClient(str(sock), timeout=120) as c:
            while True:
                try:
                    c.infer(model, {"input": small}, binary=True)
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
    }, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="batches per client")
    parser.add_argument("--model", choices=sorted(MODELS), default="wide")
    parser.add_argument("--cap", type=int, nargs="*", help="memory.max_mb (default per model)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="api.max_batch_size (0: the default, 256, which alone refuses 19,140-row batches)",
    )
    args = parser.parse_args()
    caps = args.cap or ([320, 512] if args.model == "wide" else [160, 512])
    with tempfile.TemporaryDirectory(prefix="er-bench-mem-", dir="/tmp") as tmp:
        if args.model == "wide":
            bundle = make_wide_bundle(Path(tmp), load_private_key(DEMO_KEY))
        else:
            bundle = SAMPLE
        n = MODELS[args.model][0]
        mb = batch_of(args.model, n).nbytes / 1e6
        print(
            f"{args.model}: {args.clients} clients x {args.requests} binary batches of {n} rows "
            f"({mb:.1f} MB), api.max_batch_size {args.max_batch or 'default'}, "
            f"median of {args.runs} fresh agents"
        )
        print(
            f"  {'cap MB':>7} {'idle MB':>8} {'peak MB':>8} {'peak/cap':>9} {'after MB':>9} "
            f"{'burst s':>8} {'recover s':>10}  answers (all runs)"
        )
        for cap in caps:
            results = [
                one_run(bundle, args.model, cap, args.clients, args.requests, args.max_batch)
                for _ in range(args.runs)
            ]
            runs = [r for r, _ in results]
            codes: Counter[str] = Counter()
            for _, c in results:
                codes.update(c)

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            answers = ", ".join(f"{k} {v}" for k, v in codes.most_common())
            print(
                f"  {cap:>7} {med('idle_mb'):>8.1f} {med('peak_mb'):>8.1f} "
                f"{med('peak_mb') / cap:>9.2f} {med('after_mb'):>9.1f} {med('burst_s'):>8.2f} "
                f"{med('recover_s'):>10.3f}  {answers}"
            )


if __name__ == "__main__":
    main()
