"""Measure one model in this process: load time, peak memory, latency, outputs.

Run it as a child process (`python -m agent.probe ...`) so the numbers are the
model's own and not polluted by whatever the parent has loaded. `edge-export
package` uses it to record golden outputs and the figures a device admits by.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from agent.bundle import LEGACY_BATCH_AXIS, TensorSpec
from agent.runtimes import REGISTRY
from agent.runtimes.base import (
    InferenceError,
    LoadContext,
    ModelLoadError,
    Runtime,
    RuntimeUnavailableError,
)
from agent.tensors import batch_of, slice_feeds

MB = 1024 * 1024


class _PeakSampler(threading.Thread):
    """Samples RSS every millisecond; ru_maxrss alone also counts import transients."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.peak: int = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak


def _specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            i["name"],
            i["dtype"],
            tuple(i["shape"]),
            i.get("quantization"),
            i.get("batch_axis", LEGACY_BATCH_AXIS),
        )
        for i in items
    )


def measure(
    runtime: str,
    model: Path,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    feeds: dict[str, np.ndarray],
    threads: int,
    runs: int,
    warmup: int = 3,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Returns (figures, outputs of the whole-batch run)."""
    cls = REGISTRY[runtime]  # raises KeyError for an unknown name before measuring
    config = cls.config_type()
    if cls.threads_field is not None:
        config = dataclasses.replace(config, **{cls.threads_field: threads})
    process = psutil.Process()
    baseline = process.memory_info().rss
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    rt: Runtime = cls.open(model, inputs, outputs, config, LoadContext())
    load_ms = (time.perf_counter() - t0) * 1000
    full = rt.run(feeds)
    # Latency is per case: each run takes one case, cut on every input's own batch
    # axis; inputs without a batch axis (a 0-d sample rate) go whole every time.
    batch = batch_of(inputs, feeds)
    single = slice_feeds(inputs, feeds, 0, 1)
    for _ in range(warmup):
        rt.run(single)
    times = []
    for i in range(runs):
        one = slice_feeds(inputs, feeds, i % batch, i % batch + 1)
        s = time.perf_counter()
        rt.run(one)
        times.append((time.perf_counter() - s) * 1000)
    peak = sampler.stop()
    figures = {
        "runtime": runtime,
        "library": rt.library_version(),
        "threads": threads,
        "baseline_rss_mb": round(baseline / MB, 2),
        "peak_rss_mb": round(peak / MB, 2),
        # What loading and running this model adds on top of the process it lives in.
        "model_peak_mb": round(max(peak - baseline, 0) / MB, 2),
        "load_ms": round(load_ms, 2),
        "latency_ms": {
            "batch": 1,
            "runs": runs,
            "p50": round(float(np.percentile(times, 50)), 4),
            "p90": round(float(np.percentile(times, 90)), 4),
            "p99": round(float(np.percentile(times, 99)), 4),
            "mean": round(float(np.mean(times)), 4),
        },
    }
    return figures, full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.probe", description=__doc__)
    parser.add_argument("--runtime", required=True, choices=sorted(REGISTRY))
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--spec", required=True, type=Path, help="JSON {inputs, outputs}")
    parser.add_argument("--inputs", required=True, type=Path, help=".npz keyed by input name")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--save-outputs", type=Path, help="write whole-batch outputs (.npz)")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    with np.load(args.inputs, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    try:
        figures, outputs = measure(
            args.runtime,
            args.model,
            _specs(spec["inputs"]),
            _specs(spec["outputs"]),
            feeds,
            args.threads,
            args.runs,
        )
    except (ModelLoadError, InferenceError, RuntimeUnavailableError, ImportError) as exc:
        # One line for the packager to show; a traceback would only bury it.
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.save_outputs:
        np.savez(args.save_outputs, **outputs)  # type: ignore[arg-type]
    json.dump(figures, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
