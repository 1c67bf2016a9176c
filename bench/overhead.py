"""Overhead of the agent over bare onnxruntime, per path, at batch 1 and 32.

    (a) a bare onnxruntime InferenceSession
    (b) the agent's serving path in-process (ModelHost.infer: checks, metrics, runtime)
    (c) the local API over the Unix socket (binary tensor extension), agent in a child process

Rounds of the three paths are interleaved so drift hits them alike. Targets: on the
~1 ms model, b/a at p50 within 1.05; on any model, c - a under 200 us at p50, batch 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
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


def bench_model(
    bundle: Path,
    name: str,
    input_name: str,
    make: Callable[[int], np.ndarray],
    rounds: int,
    per_round: int,
) -> None:
    import onnxruntime as ort

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
                },
                {},
            )
        )
        loaded = agent.admission.install(bundle)
        session = ort.InferenceSession(
            str(loaded.directory / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        with (
            agent_process(bundle, api="max_batch_size = 1024") as (_, sock, _ready),
            ApiClient(str(sock)) as client,
        ):
            for batch in (1, 32):
                x = make(batch)
                feeds = {input_name: x}
                paths: dict[str, Callable[[], object]] = {
                    "a bare onnxruntime": lambda f=feeds: session.run(None, f),
                    "b agent in-process": lambda f=feeds: agent.host.infer(name, f),
                    "c unix-socket API": lambda f=feeds: client.infer(name, f, binary=True),
                }
                results: dict[str, list[float]] = {k: [] for k in paths}
                for fn in paths.values():
                    timed(fn, 20)  # warm up
                for _ in range(rounds):
                    for key, fn in paths.items():
                        results[key] += timed(fn, per_round)
                a50, a99 = (
                    pct(results["a bare onnxruntime"], 50),
                    pct(results["a bare onnxruntime"], 99),
                )
                print(f"\n{name} batch {batch} ({rounds * per_round} runs per path)")
                print(
                    f"  {'path':24} {'p50 us':>10} {'p99 us':>10} {'p50 ratio':>10} {'p50 +us':>9}"
                )
                for key, values in results.items():
                    p50, p99 = pct(values, 50), pct(values, 99)
                    print(f"  {key:24} {p50:10.1f} {p99:10.1f} {p50 / a50:10.3f} {p50 - a50:9.1f}")
                del a99
        agent.host.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "overhead of the agent over bare onnxruntime (medians; ratios against (a) in the same run)"
    )
    bench_model(
        SAMPLE,
        "digits",
        "input",
        lambda b: rng.random((b, 1, 8, 8), dtype=np.float32),
        args.rounds,
        args.per_round,
    )
    with tempfile.TemporaryDirectory(prefix="er-mlp-") as tmp:
        mlp = package_mlp(Path(tmp))
        bench_model(
            mlp,
            "mlp",
            "input",
            lambda b: rng.standard_normal((b, 1024)).astype(np.float32),
            args.rounds,
            max(args.per_round // 5, 5),
        )


if __name__ == "__main__":
    main()
