"""What a model costs in memory on this device, measured while it is validated.

A manifest's `peak_memory_mb` was measured on the build machine (or not at all: it is
just a number in a file). Before a candidate may serve, the agent runs it here on
zero-filled inputs at 1 and at `PROBE_ROWS` rows (again with more rows when 32 are
too cheap to see) and reads the process's peak RSS (`VmHWM`, reset through
`/proc/self/clear_refs`) around each run: the difference gives what one more row
costs in runtime activations, and what a run costs at all. Admission
then judges the candidate on the larger of the manifest's figure and this one, and
every request is admitted on `rows x per-row cost` against the headroom under the soft
limit.

The figure is process-wide: a request running on the outgoing model at the same time
makes it larger, never smaller, which errs on the side of refusing. A model whose
activations depend on input *values* (data-dependent shapes) can cost more than its
zero-filled probes; the soft-limit watcher remains the backstop for those.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import GoldenFileError, Limits, Manifest, TensorSpec
from agent.memory import MB, current_rss, release_free_memory
from agent.npz import inspect_npz
from agent.runtimes.base import Feeds, Runtime

log = logging.getLogger(__name__)

# Rows of the larger probe: enough for the per-row slope to stand above the
# allocator's noise, small enough to cost a fraction of a second on a small board.
PROBE_ROWS = 32
_SMALL_PROBE_BYTES = 4 << 20
_REPROBE_BYTES = 16 << 20
_MAX_PROBE_ROWS = 4096
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Footprint:
    """Measured memory of one loaded model: bytes above the RSS before it was loaded."""

    load_bytes: int  # what loading the runtime session added
    fixed_bytes: int  # what any run costs beyond the session (1-row probe)
    per_row_bytes: int  # what each more row costs
    input_bytes_per_row: int  # input bytes of one probe row (scales rows of other shapes)
    batched: bool  # False when the inputs have no leading batch axis to probe along
    # GPU memory the model added while loaded and probed (agent.device_memory), read
    # where a GPU serves it; 0 with device_source "" on a CPU.
    device_bytes: int = 0
    device_source: str = ""  # "nvml" (discrete GPU) | "nvmap" (Jetson, unified)
    device_unified: bool = False

    def request_bytes(self, input_bytes: int) -> int:
        """Runtime memory a request of `input_bytes` of input is expected to need."""
        if not self.batched or self.input_bytes_per_row <= 0:
            return self.fixed_bytes
        rows = input_bytes / self.input_bytes_per_row
        return int(self.fixed_bytes + math.ceil(rows * self.per_row_bytes))

    def peak_bytes(self, rows: int) -> int:
        """Load plus one run of `rows` rows: what validating with `rows` golden rows
        costs in host memory, and on unified memory in the GPU's share of it too."""
        host = (
            self.load_bytes + self.fixed_bytes + (rows * self.per_row_bytes if self.batched else 0)
        )
        return host + (self.device_bytes if self.device_unified else 0)

    def as_dict(self) -> dict[str, float | bool | str]:
        out: dict[str, float | bool | str] = {
            "load_mb": round(self.load_bytes / MB, 2),
            "fixed_mb": round(self.fixed_bytes / MB, 2),
            "per_row_mb": round(self.per_row_bytes / MB, 4),
            "batched": self.batched,
        }
        if self.device_source:
            out["device_mb"] = round(self.device_bytes / MB, 2)
            out["device_source"] = self.device_source
            out["device_unified"] = self.device_unified
        return out


class PeakMeter:
    """The process's peak RSS since the last `reset`, or the current RSS where the
    kernel does not let us reset the high-water mark (then arena growth, which stays
    resident, is what is seen)."""

    def __init__(self) -> None:
        self.resettable = self._try_reset()

    @staticmethod
    def _try_reset() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _read_hwm() is not None

    def reset(self) -> int:
        """Start a new measurement; returns the RSS it starts from."""
        if self.resettable:
            self._try_reset()
        return current_rss()

    def peak(self) -> int:
        hwm = _read_hwm() if self.resettable else None
        return max(hwm or 0, current_rss())


def _read_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def golden_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays in a golden .npz, read from the array headers only (a
    hostile file may expand to gigabytes; its headers say how big without that).
    The bundle's one .npz header reader (agent.npz), with the bundle's caps. Never
    raises: a file it cannot read gives {} (the golden replay refuses it)."""
    limits = Limits()
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            headers = inspect_npz(
                fh, 0, size, path.name, limits.max_golden_arrays, limits.max_golden_bytes
            )
    except (GoldenFileError, OSError):
        return {}
    return {name: h.shape for name, h in headers.items()}


def golden_rows(shapes: dict[str, tuple[int, ...]], specs: tuple[TensorSpec, ...]) -> int:
    """Cases in the golden inputs, counted on each input's own batch axis."""
    axes = {s.name: s.batch_axis for s in specs}
    rows = 0
    for name, shape in shapes.items():
        axis = axes.get(name)
        rows = max(rows, shape[axis] if axis is not None and axis < len(shape) else 1)
    return rows


def _probe_feeds(
    specs: tuple[TensorSpec, ...], rows: int, like: dict[str, tuple[int, ...]]
) -> Feeds:
    # Other dynamic axes as in the golden inputs (else 1): a model may need a minimum
    # size there; the per-input-byte scaling covers requests that send more.
    feeds: Feeds = {}
    for spec in specs:
        golden = like.get(spec.name, ())
        shape = []
        for i, d in enumerate(spec.shape):
            if d != -1:
                shape.append(d)
            elif i == spec.batch_axis:
                shape.append(rows)
            else:
                shape.append(golden[i] if len(golden) == len(spec.shape) and golden[i] > 0 else 1)
        feeds[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
    return feeds


def batched(specs: tuple[TensorSpec, ...]) -> bool:
    """Whether requests to these inputs carry rows (cases) whose count varies."""
    return any(s.batch_axis is not None for s in specs)


def measure(
    runtime: Runtime,
    manifest: Manifest,
    meter: PeakMeter,
    base_rss: int,
    load_peak: int,
    like: dict[str, tuple[int, ...]] | None = None,
    budget_bytes: int | None = None,
) -> Footprint:
    """Probe the loaded `runtime`; `base_rss` is the RSS before it was loaded and
    `load_peak` the peak RSS seen while it loaded. `like` holds the golden inputs'
    shapes. `budget_bytes` bounds what the probes may take (the headroom under the
    soft limit: live requests beside a candidate must not be shed because of its
    probes); the multi-row probes use no more rows than the one-row cost says fit.
    Runtime errors (InferenceError) propagate."""
    specs = manifest.inputs
    like = like or {}
    is_batched = batched(specs)
    load_bytes = max(0, load_peak - base_rss)
    one_row = _probe_feeds(specs, 1, like)
    row_bytes = sum(int(v.nbytes) for v in one_row.values())
    # Freed heap still resident would be reused without showing in RSS: hand it back
    # first so the probes' allocations are seen.
    release_free_memory()
    start = meter.reset()
    runtime.run(one_row)
    one = max(0, meter.peak() - start)
    per_row = 0
    # How many rows the budget lets a probe run, judged on the one-row cost (a row
    # costs at most what one row took, counted from the same start).
    fits = PROBE_ROWS if budget_bytes is None else budget_bytes // (2 * max(one, 1))
    rows = min(PROBE_ROWS, fits)
    if is_batched and rows < 2:
        # Not even two rows fit beside what is served: take one row's cost per row
        # (an upper bound for any batch), and let admission judge it.
        per_row = one
    elif is_batched:
        # The arena keeps what the 1-row run took, so measure from the same start.
        meter.reset()
        runtime.run(_probe_feeds(specs, rows, like))
        many = max(0, meter.peak() - start)
        # The slope alone under-reads an arena that grows in powers of two; the
        # average over the larger probe bounds it from above for batches near it.
        per_row = max((many - one) // (rows - 1), many // rows)
        if many < _SMALL_PROBE_BYTES:
            # Cheap rows: 32 of them are lost in the allocator's granularity, and a
            # replay of 65,536 such rows is not cheap. Probe again with enough rows
            # to cost about _REPROBE_BYTES, and take that figure instead.
            n = min(_MAX_PROBE_ROWS, max(2 * PROBE_ROWS, _REPROBE_BYTES // max(per_row, 1024)))
            if budget_bytes is not None:
                n = max(2, min(n, budget_bytes // (2 * max(per_row, 1))))
            meter.reset()
            runtime.run(_probe_feeds(specs, n, like))
            more = max(0, meter.peak() - start)
            per_row = max((more - one) // (n - 1), more // n)
    # Give back what the probes grew the runtime's pools by: serving starts from the
    # footprint of the model, not of its largest probe.
    runtime.run_and_release(one_row)
    footprint = Footprint(load_bytes, one, per_row, row_bytes, is_batched)
    log.info(
        "measured %s %s on %s: %s",
        manifest.name,
        manifest.version,
        runtime.name,
        footprint.as_dict(),
    )
    return footprint


__all__ = [
    "PROBE_ROWS",
    "Footprint",
    "PeakMeter",
    "batched",
    "golden_rows",
    "golden_shapes",
    "measure",
]
