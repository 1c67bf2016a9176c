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


class ProbeInputs:
    """The probe's inputs for one selection, read once: every variant of a bundle takes
    the manifest's inputs and its one `golden.inputs` file (a variant has only its own
    golden outputs), so the candidates share them; each asks for its own rows."""

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        self.specs = manifest.inputs
        golden = manifest.golden_inputs
        self.shapes = golden_shapes(directory / golden) if golden is not None else {}
        # None: no usable golden inputs, the probe is zeros of the manifest's shapes.
        self.cases: dict[str, np.ndarray] | None = None
        if golden is None or set(self.shapes) != {s.name for s in self.specs}:
            return
        # The headers were read with the bundle's caps (golden_shapes), so the load is bounded.
        with np.load(directory / golden, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        self.cases = {}
        for spec in self.specs:
            array = arrays[spec.name]
            axis = spec.batch_axis
            if axis is not None and 0 <= axis < array.ndim and array.shape[axis] >= 1:
                array = np.take(array, [0], axis=axis)  # the first case, repeated by feeds
            self.cases[spec.name] = array

    def feeds(self, rows: int) -> Feeds:
        """`rows` cases for the latency probe (rows is ignored for inputs without a batch
        axis). Fresh arrays each call: one candidate's run never sees another's."""
        if self.cases is None:
            return _probe_feeds(self.specs, rows, self.shapes)
        feeds: Feeds = {}
        for spec in self.specs:
            array = self.cases[spec.name]
            axis = spec.batch_axis
            if axis is not None and 0 <= axis < array.ndim and array.shape[axis] >= 1:
                feeds[spec.name] = np.ascontiguousarray(np.repeat(array, rows, axis=axis))
            else:
                feeds[spec.name] = np.array(array, order="C", copy=True)
        return feeds

    def row_bytes(self) -> int:
        """Bytes of one case of every input (what a row adds to a request)."""
        return sum(int(a.nbytes) for a in self.feeds(1).values())


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


__all__ = ["TIMED_RUNS", "WARM_RUNS", "ProbeInputs", "median_ms"]
