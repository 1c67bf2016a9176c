"""Latency of one loaded variant on this device: a few warm runs, the median.

The probe is the first golden case repeated to the probe batch along each input's
batch axis (real input: some models refuse zeros, e.g. an index range); without
golden inputs, zeros of the manifest's shapes (agent.footprint's probes). Figures
are compared between variants measured one after another in the same process,
never against a fixed number.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from agent.bundle import Manifest
from agent.footprint import _probe_feeds, golden_shapes
from agent.runtimes.base import Feeds, Runtime

WARM_RUNS = 2
TIMED_RUNS = 7


def probe_feeds(manifest: Manifest, directory: Path, rows: int) -> Feeds:
    """`rows` cases for the latency probe (rows is ignored for inputs without a batch axis)."""
    golden = manifest.golden_inputs
    shapes = golden_shapes(directory / golden) if golden is not None else {}
    if golden is None or set(shapes) != {s.name for s in manifest.inputs}:
        return _probe_feeds(manifest.inputs, rows, shapes)
    # The headers were read with the bundle's caps (golden_shapes), so the load is bounded.
    with np.load(directory / golden, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    feeds: Feeds = {}
    for spec in manifest.inputs:
        array = arrays[spec.name]
        axis = spec.batch_axis
        if axis is not None and 0 <= axis < array.ndim and array.shape[axis] >= 1:
            first = np.take(array, [0], axis=axis)
            array = np.repeat(first, rows, axis=axis)
        feeds[spec.name] = np.ascontiguousarray(array)
    return feeds


def median_ms(
    runtime: Runtime, feeds: Feeds, warm: int = WARM_RUNS, runs: int = TIMED_RUNS
) -> float:
    """Median wall milliseconds of `runs` runs after `warm` untimed ones.
    Runtime errors (InferenceError) propagate: the caller rejects the variant."""
    for _ in range(warm):
        runtime.run(feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        runtime.run(feeds)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


__all__ = ["TIMED_RUNS", "WARM_RUNS", "median_ms", "probe_feeds"]
