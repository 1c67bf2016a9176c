"""Agent footprint: RSS idle with no model and with the sample model, and start to ready.

Each figure is the median of several fresh starts. "start to ready" is measured from
spawning `edge-agent run` to the first 200 from /v2/health/ready (so it includes the
Python interpreter start), and also as the agent logs it (config loaded to ready).
Targets: RSS with the sample model under 80 MB; start to ready under 2 s.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import psutil
from _common import SAMPLE, agent_process

from agent.api.client import ApiClient


def measure(bundle: Path | None, runtime: str | None) -> tuple[float, float, float]:
    """(RSS when ready, RSS after 200 requests of 1-10 rows, seconds to ready)."""
    model = f'runtime = "{runtime}"' if runtime else ""
    with agent_process(bundle, model=model) as (proc, sock, ready):
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        with ApiClient(str(sock)) as c:
            c.get_json("/v2/health/live")
            if bundle is not None:
                x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
                for i in range(200):
                    c.infer("digits", {"input": x[: i % 10 + 1]}, binary=i % 2 == 0)
        serving = psutil.Process(proc.pid).memory_info().rss / 2**20
    return rss, serving, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    rows = [
        ("no model", None, None),
        ("sample, onnxruntime", SAMPLE, "onnxruntime"),
        ("sample, litert", SAMPLE, "litert"),
    ]
    print(f"agent footprint (median of {args.starts} starts)")
    print(f"  {'case':24} {'RSS MB ready':>13} {'after 200 req':>14} {'start->ready s':>15}")
    for label, bundle, runtime in rows:
        results = [measure(bundle, runtime) for _ in range(args.starts)]
        rss = statistics.median(r[0] for r in results)
        serving = statistics.median(r[1] for r in results)
        ready = statistics.median(r[2] for r in results)
        print(f"  {label:24} {rss:13.1f} {serving:14.1f} {ready:15.3f}")


if __name__ == "__main__":
    main()
