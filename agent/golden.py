"""Replay a bundle's golden cases on this device before it may serve.

The golden files are the bundle's own evidence, so they are treated as input:
their headers are inspected with caps before numpy reads them (agent.npz), a
reference output that is empty or not finite is refused (it would check
nothing), and the comparison is NaN-aware (`diff > bound` is False for NaN, so a
model that outputs NaN used to pass).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from agent.bundle import (
    BundleError,
    GoldenFileError,
    Limits,
    Manifest,
    Variant,
    check_goldens,
    tolerance_problem,
)
from agent.errors import ServingError
from agent.npz import ArrayHeader, inspect_npz
from agent.runtimes.base import Runtime
from agent.tensors import validate_feeds
from agent.tolerance import ToleranceReport, compare

log = logging.getLogger(__name__)


class GoldenMismatchError(BundleError):
    """The model's outputs on this device differ from the recorded ones beyond tolerance."""

    code = "bundle.golden_mismatch"


def _inspect(path: Path, limits: Limits) -> dict[str, ArrayHeader]:
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            return inspect_npz(
                fh, 0, size, path.name, limits.max_golden_arrays, limits.max_golden_bytes
            )
    except OSError as exc:
        raise GoldenFileError(f"cannot read golden file {path.name}: {exc.strerror}") from exc


def _load(path: Path) -> dict[str, np.ndarray]:
    # Headers were inspected, so what np.load allocates is bounded by the caps. The data
    # behind them can still be corrupt, and np.load then fails in zlib, zipfile, struct
    # or numpy's own parser, each with its own exception: all of them are the file's fault.
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise GoldenFileError(f"cannot read golden file {path.name}: {exc}") from exc


def replay_golden(
    manifest: Manifest,
    directory: Path,
    runtime: Runtime,
    limits: Limits | None = None,
    variant: Variant | None = None,
) -> ToleranceReport | None:
    """Run the golden cases on `runtime` and judge them by the bundle's rule for its family.

    `variant` replays that variant's own outputs by its own rule; None (or a legacy
    variant) the outputs of the runtime's format by the manifest's rule for it.
    None when the bundle has no golden cases for it. Raises GoldenFileError for
    unusable evidence and GoldenMismatchError when the inputs do not fit or fail to
    run; a mismatch beyond the rule is in the report's failures.
    """
    limits = limits or Limits()
    fmt = runtime.format
    if variant is not None and not variant.legacy:
        outputs_path, rule, what = (
            variant.golden_outputs,
            variant.tolerance,
            f"variant {variant.id}",
        )
    else:
        outputs_path = manifest.golden_outputs.get(fmt)
        rule, what = manifest.golden_tolerance.for_format(fmt), fmt
    if manifest.golden_inputs is None or outputs_path is None:
        log.warning("bundle %s has no golden cases for %s; not validated", manifest.name, what)
        return None
    paths = [manifest.golden_inputs, outputs_path]
    # Re-inspected here: `current` may have been unpacked by an older, laxer agent.
    check_goldens(manifest, {p: _inspect(directory / p, limits) for p in paths}, limits)
    inputs = _load(directory / paths[0])
    expected = _load(directory / paths[1])
    if not expected:
        raise GoldenFileError(f"golden file {paths[1]} holds no outputs; it would check nothing")
    for name, want in expected.items():
        if want.size == 0 or not np.isfinite(want.astype(np.float64)).all():
            raise GoldenFileError(
                f"golden output {name!r} in {paths[1]} is empty or holds NaN/inf; "
                "a reference must be finite numbers"
            )
    problem = tolerance_problem(rule, expected)
    if problem is not None:
        raise GoldenFileError(f"{paths[1]}: {problem}")
    try:
        # The same checks a request meets, so golden cases that disagree with the
        # manifest's own shapes and batch axes are named as such, not as a runtime crash.
        validate_feeds(manifest.inputs, inputs, max_batch=sys.maxsize)
    except ServingError as exc:
        raise GoldenMismatchError(f"golden inputs do not fit the manifest: {exc}") from exc
    try:
        got = runtime.run(inputs)
    except Exception as exc:
        raise GoldenMismatchError(f"golden inputs fail to run on {runtime.name}: {exc}") from exc
    return compare(rule, runtime.family(), expected, got)


def check_golden(
    manifest: Manifest,
    directory: Path,
    runtime: Runtime,
    limits: Limits | None = None,
    variant: Variant | None = None,
) -> dict[str, float]:
    """Return the max abs difference per output; raise GoldenMismatchError beyond the rule."""
    report = replay_golden(manifest, directory, runtime, limits, variant)
    if report is None:
        return {}
    if not report.ok:
        raise GoldenMismatchError(
            f"golden cases do not reproduce on {runtime.name} ({report.family} rule): "
            + "; ".join(report.failures)
        )
    log.info(
        "golden cases of %s %s reproduce on %s (%s rule): %s",
        manifest.name,
        manifest.version,
        runtime.name,
        report.family,
        ", ".join(
            f"{r.name} max diff {r.max_abs_diff:.3g} of {r.allowance:.3g}"
            + (f", top-1 {r.top1:.0%}" if r.top1 is not None else "")
            for r in report.outputs.values()
        ),
    )
    return report.max_abs_diff
