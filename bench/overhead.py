"""Overhead of the agent over bare onnxruntime, per path, at batch 1 and 32.

    (a) a bare onnxruntime InferenceSession
    (b) the agent's serving path in-process (ModelHost.infer: checks, metrics, runtime)
    (c) the local API over the Unix socket (binary tensor extension), agent in a child process

Rounds of the three paths are interleaved so drift hits them alike. Targets: on the
~1 ms model, b/a at p50 within 1.05; on any model, c - a under 200 us at p50, batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from _common import SAMPLE, agent_process, package_mlp, pct

from agent.api.client import ApiClient
from agent.config.loader import parse_config
from agent.service import Agent


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        out.append((time.perf_counter() - s) * 1e6)
    return out


@contextlib.contextmanager
def minimal_server(
    model: Path, input_name: str, row_shape: tuple[int, ...], threads: int
) -> Iterator[ApiClient]:
    """bench/_minimal_server.py in a child process, and a client for it."""
    with tempfile.TemporaryDirectory(prefix="er-min-", dir="/tmp") as tmp:
        sock = f"{tmp}/min.sock"
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_minimal_server.py")), str(model),
             sock, input_name, ",".join(str(d) for d in row_shape), str(threads)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            with ApiClient(sock) as client:
                yield client
        finally:
            proc.terminate()
            proc.wait()


def runtime_seconds(client: ApiClient) -> tuple[float, float]:
    """(sum, count) of the agent's own runtime-call latency histogram."""
    lines = dict(
        line.rsplit(" ", 1) for line in client.metrics().splitlines() if not line.startswith("#")
    )
    return (
        float(lines["edgerun_inference_latency_seconds_sum"]),
        float(lines["edgerun_inference_latency_seconds_count"]),
    )


def bench_model(
    bundle: Path,
    name: str,
    input_name: str,
    make: Callable[[int], np.ndarray],
    rounds: int,
    per_round: int,
    threads: int,
) -> None:
    with tempfile.TemporaryDirectory(prefix="er-ov-", dir="/tmp") as tmp:
        agent = Agent(
            parse_config(
                {
                    "state_dir": f"{tmp}/state",
                    "trust": {
                        "public_keys": [
                            str(
                                Path(__file__).resolve().parents[1]
                                / "models/keys/demo-INSECURE.pub"
                            )
                        ]
                    },
                    "api": {"socket": f"{tmp}/unused.sock", "max_batch_size": 1024},
                    "runtimes": {"onnxruntime": {"intra_op_threads": threads}},
                },
                {},
            )
        )
        loaded = agent.admission.install(bundle)
        # (a) and (b) share one session, so the difference is the agent's own layer and
        # not two thread pools competing for two cores.
        session = loaded.runtime.session  # type: ignore[attr-defined]
        with (
            agent_process(
                bundle,
                api="max_batch_size = 1024",
                extra=f"[runtimes.onnxruntime]\nintra_op_threads = {threads}\n",
            ) as (_, sock, _ready),
            ApiClient(str(sock)) as client,
            minimal_server(
                loaded.directory / "model.onnx", input_name, make(1).shape[1:], threads
            ) as minimal,
        ):
            for batch in (1, 32):
                x = make(batch)
                feeds = {input_name: x}
                paths: dict[str, Callable[[], object]] = {
                    "a bare onnxruntime": lambda f=feeds: session.run(None, f),
                    "b agent in-process": lambda f=feeds: agent.host.infer(name, f),
                    "c unix-socket API": lambda f=feeds: client.infer(name, f, binary=True),
                    "  (empty GET, for scale)": lambda: client.request("GET", "/v2/health/live"),
                    # The client turns the reply into an array here too: on two vCPUs even
                    # a few microseconds of client work between requests shift the
                    # round trip by ~100 us (scheduling), so both paths must do it.
                    "d minimal server": lambda f=feeds: np.frombuffer(
                        minimal.request("POST", "/", f[input_name].tobytes())[2], np.float32
                    ),
                }
                results: dict[str, list[float]] = {k: [] for k in paths}
                in_agent: list[float] = []  # mean runtime time inside the agent per block
                for fn in paths.values():
                    timed(fn, 20)  # warm up
                # In-process paths (a, b) and the socket paths (c, GET) run in separate
                # phases: idle ORT threads spin after a run, and on two cores one
                # process's spinning taxes the other. Phases alternate to share drift.
                phases = [
                    [k for k in paths if k[0] in "ab"],
                    [k for k in paths if k[0] not in "abd"],
                    [k for k in paths if k[0] == "d"],
                ]
                for _ in range(rounds):
                    for phase in phases:
                        time.sleep(0.05)
                        order = list(phase)
                        random.shuffle(order)
                        for key in order:
                            timed(paths[key], 5)  # re-warm: sleeping pool threads, caches
                            if key.startswith("c"):
                                before = runtime_seconds(client)
                            results[key] += timed(paths[key], per_round)
                            if key.startswith("c"):
                                after = runtime_seconds(client)
                                in_agent.append((after[0] - before[0]) / (after[1] - before[1]))
                a50, a99 = (
                    pct(results["a bare onnxruntime"], 50),
                    pct(results["a bare onnxruntime"], 99),
                )
                what = "ORT default threads" if threads == 0 else f"{threads} intra-op thread(s)"
                print(f"\n{name} batch {batch}, {what} ({rounds * per_round} runs per path)")
                print(
                    f"  {'path':24} {'p50 us':>10} {'p99 us':>10} {'p50 ratio':>10} {'p50 +us':>9}"
                )
                for key, values in results.items():
                    p50, p99 = pct(values, 50), pct(values, 99)
                    print(f"  {key:24} {p50:10.1f} {p99:10.1f} {p50 / a50:10.3f} {p50 - a50:9.1f}")
                del a99
                d50 = pct(results["d minimal server"], 50)
                print(
                    f"  (c) minus (d), what the agent adds over the leanest socket server: "
                    f"{pct(results['c unix-socket API'], 50) - d50:.1f} us"
                )
                runtime_us = float(np.median(in_agent)) * 1e6
                c50 = pct(results["c unix-socket API"], 50)
                print(
                    f"  (c) minus the runtime time inside the agent ({runtime_us:.1f} us, "
                    f"/metrics): {c50 - runtime_us:.1f} us"
                )
        agent.host.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0, 1],
        help="intra-op threads for every path (0: ORT's default, one per core)",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "overhead of the agent over bare onnxruntime (medians; ratios against (a) in the same run)"
    )
    with tempfile.TemporaryDirectory(prefix="er-mlp-") as tmp:
        mlp = package_mlp(Path(tmp))
        for threads in args.threads:
            bench_model(
                SAMPLE,
                "digits",
                "input",
                lambda b: rng.random((b, 1, 8, 8), dtype=np.float32),
                args.rounds,
                args.per_round,
                threads,
            )
            bench_model(
                mlp,
                "mlp",
                "input",
                lambda b: rng.standard_normal((b, 1024)).astype(np.float32),
                args.rounds,
                max(args.per_round // 5, 5),
                threads,
            )


if __name__ == "__main__":
    main()
