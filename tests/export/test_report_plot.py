"""The report plot's log axes: no overlapping tick labels, measured on the rendered text.

The issue's plot labelled the minor ticks of a narrow log axis ("3x10^-2 4x10^-2")
and those labels ran into each other. These tests render the real figure with the
Agg backend and compare the labels' window extents.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from export.pipeline.report import figure, overlapping, tick_label_boxes


def _report(latencies: list[float], sizes: list[int]) -> dict[str, object]:
    stages = [
        {"stage": f"s{i}", "format": "onnx", "metric": 95.0 + i, "size_bytes": size,
         "latency_ms": {"p50": lat, "p99": lat * 1.2}}
        for i, (lat, size) in enumerate(zip(latencies, sizes, strict=True))
    ]  # fmt: skip
    return {"name": "d", "version": "1.0.0", "task": "classification", "stages": stages,
            "selected": {"onnx": "s0"}}  # fmt: skip


@pytest.mark.parametrize(
    "latencies",
    [
        [0.031, 0.036, 0.044],  # the case: inside one decade, near 3-4 x 10^-2
        [0.012, 0.09],  # about one decade
        [0.012, 0.2],  # a bit more: matplotlib's own minor labels collide here
        [0.02, 0.4, 1.3],  # under two decades
        [0.004, 3.0, 250.0],  # five decades
    ],
)
def test_log_axis_labels_do_not_overlap(latencies: list[float]) -> None:
    sizes = [int(40_000 * (1 + i)) for i in range(len(latencies))]
    fig = figure(_report(latencies, sizes))
    try:
        for ax in fig.axes:
            assert tick_label_boxes(fig, ax, minor=True) == []  # minor labels are off
            boxes = tick_label_boxes(fig, ax)
            assert len(boxes) >= 2, [t.get_text() for t in ax.get_xticklabels()]
            assert not overlapping(boxes)
    finally:
        plt.close(fig)


def test_overlap_check_sees_matplotlibs_default_labels() -> None:
    """The check is not vacuous: matplotlib's default log formatter on an axis of a bit
    more than a decade labels minor ticks ("3x10^-2 4x10^-2"), and they collide."""
    fig, ax = plt.subplots(figsize=(5.5, 4.6), dpi=110)
    try:
        ax.scatter([0.012, 0.2], [1, 2])
        ax.set_xscale("log")
        ax.set_xlim(0.012, 0.2)
        minor = tick_label_boxes(fig, ax, minor=True)
        assert len(minor) >= 2
        assert overlapping(minor + tick_label_boxes(fig, ax))
    finally:
        plt.close(fig)
