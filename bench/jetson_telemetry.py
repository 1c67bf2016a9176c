"""What Jetson telemetry costs the agent: parsing a tegrastats line, reading /sys, /metrics.

    python bench/jetson_telemetry.py

Prints medians over repeated runs on this machine (not a Jetson: the lines are the
captured fixtures, the /sys trees the fixture layouts): µs per tegrastats line per
JetPack generation, µs per /sys reading, and the /metrics rendering with the Jetson
gauges against without them (ratio, same process).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.hardware.gauges import accelerator_gauges  # noqa: E402
from agent.hardware.sysfs import JetsonSysfs  # noqa: E402
from agent.hardware.tegrastats import parse_line  # noqa: E402
from agent.metrics import Metrics  # noqa: E402

FIXTURES = ROOT / "tests/agent/fixtures"


def median_us(work: Callable[[], object], inner: int, rounds: int = 15) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(inner):
            work()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(samples)


def main() -> None:
    print("tegrastats line parse (median µs per line)")
    for path in sorted((FIXTURES / "tegrastats").glob("*.txt")):
        lines = [line for line in path.read_text().splitlines() if line]
        us = median_us(lambda lines=lines: [parse_line(x) for x in lines], 200) / len(lines)
        print(f"  {path.stem:24s} {us:8.1f}")
    print("/sys reading (median µs per reading)")
    for tree in ("nano-jp4", "orin-nano-jp6"):
        sysfs = JetsonSysfs(FIXTURES / "jetson_sysfs" / tree)
        print(f"  {tree:24s} {median_us(sysfs.read, 200):8.1f}")
    metrics = Metrics()
    for i in range(1000):
        metrics.observe(0.0002 + i * 1e-7, 1, 1)
    line = (FIXTURES / "tegrastats/jetpack6-orin-nano.txt").read_text().splitlines()[0]
    report = parse_line(line)
    gauges = {"edgerun_model_ready": ("1 when a model is served.", 1.0)}
    bare = median_us(lambda: metrics.render_prometheus(gauges, {}), 500)
    full = median_us(lambda: metrics.render_prometheus(gauges, {}, accelerator_gauges(report)), 500)
    print("/metrics render (median µs)")
    print(f"  without Jetson gauges     {bare:8.1f}")
    print(f"  with Jetson gauges        {full:8.1f}   ratio {full / bare:.2f}x")


if __name__ == "__main__":
    main()
