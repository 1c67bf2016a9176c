"""Inference metrics: counters and histograms for /metrics, windows for telemetry."""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_WINDOW_CAP = 20_000  # latencies kept between two telemetry reports


@dataclass(frozen=True)
class GaugeFamily:
    """A gauge with labels (`edgerun_temperature_celsius{zone="tj"}`); one sample per label set."""

    name: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(
                f"{self.name}{{{text}}} {_num(value)}" if text else f"{self.name} {_num(value)}"
            )
        return lines


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """Upper bucket bound containing the q-quantile (Prometheus-style estimate)."""
        if not self.count:
            return None
        rank = q * self.count
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            if running >= rank:
                return bound if bound != float("inf") else self.buckets[-1]
        return self.buckets[-1]

    def render(self, name: str, labels: str = "") -> list[str]:
        lines = []
        running = 0
        sep = "," if labels else ""
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{lab} {self.total:.6f}")
        lines.append(f"{name}_count{lab} {self.count}")
        return lines


class Metrics:
    """Thread-safe; one instance per agent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = 0
        self.items = 0
        self.errors: Counter[str] = Counter()
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch = _Histogram(tuple(float(b) for b in BATCH_BUCKETS))
        # Rows per runtime call: differs from per-request rows when micro-batching merges.
        self.runtime_batch = _Histogram(tuple(float(b) for b in BATCH_BUCKETS))
        self._window: list[float] = []
        self._window_batches: list[int] = []
        self._window_errors = 0
        self._window_start = time.monotonic()

    def observe(self, seconds: float, batch: int, runtime_rows: int | None = None) -> None:
        """One answered request; `runtime_rows` when it was also its own runtime call."""
        with self._lock:
            if runtime_rows is not None:
                self.runtime_batch.observe(float(runtime_rows))
            self.requests += 1
            self.items += batch
            self.latency.observe(seconds)
            self.batch.observe(float(batch))
            if len(self._window) < _WINDOW_CAP:
                self._window.append(seconds)
                self._window_batches.append(batch)

    def runtime_call(self, rows: int) -> None:
        with self._lock:
            self.runtime_batch.observe(float(rows))

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1
            self._window_errors += 1

    def window(self, reset: bool = True) -> dict[str, Any]:
        """Figures since the previous call (for telemetry), plus totals since start."""
        with self._lock:
            lat = np.asarray(self._window) * 1000
            batches = self._window_batches
            errors = self._window_errors
            elapsed = max(time.monotonic() - self._window_start, 1e-9)
            if reset:
                self._window, self._window_batches = [], []
                self._window_errors = 0
                self._window_start = time.monotonic()
            totals = {
                "requests": self.requests,
                "items": self.items,
                "errors": sum(self.errors.values()),
                "p50_ms": _ms(self.latency.quantile(0.5)),
                "p95_ms": _ms(self.latency.quantile(0.95)),
                "p99_ms": _ms(self.latency.quantile(0.99)),
            }
        window: dict[str, Any] = {
            "requests": len(lat),
            "errors": errors,
            "rate_per_s": round(len(lat) / elapsed, 3),
            "seconds": round(elapsed, 3),
        }
        if len(lat):
            window.update(
                p50_ms=round(float(np.percentile(lat, 50)), 4),
                p95_ms=round(float(np.percentile(lat, 95)), 4),
                p99_ms=round(float(np.percentile(lat, 99)), 4),
                mean_batch=round(float(np.mean(batches)), 3),
                max_batch=int(max(batches)),
            )
        return {"window": window, "total": totals}

    def render_prometheus(
        self,
        gauges: dict[str, tuple[str, float]],
        info: dict[str, str],
        families: Sequence[GaugeFamily] = (),
    ) -> str:
        with self._lock:
            lines = [
                "# HELP edgerun_inference_requests_total Inference requests answered.",
                "# TYPE edgerun_inference_requests_total counter",
                f"edgerun_inference_requests_total {self.requests}",
                "# HELP edgerun_inference_items_total Batch rows inferred.",
                "# TYPE edgerun_inference_items_total counter",
                f"edgerun_inference_items_total {self.items}",
                "# HELP edgerun_inference_errors_total Refused or failed requests by code.",
                "# TYPE edgerun_inference_errors_total counter",
            ]
            for code, n in sorted(self.errors.items()):
                lines.append(f'edgerun_inference_errors_total{{code="{code}"}} {n}')
            lines += [
                "# HELP edgerun_inference_latency_seconds Time in the runtime per request.",
                "# TYPE edgerun_inference_latency_seconds histogram",
                *self.latency.render("edgerun_inference_latency_seconds"),
                "# HELP edgerun_inference_batch_size Rows per request.",
                "# TYPE edgerun_inference_batch_size histogram",
                *self.batch.render("edgerun_inference_batch_size"),
                "# HELP edgerun_runtime_batch_size Rows per runtime call (after micro-batching).",
                "# TYPE edgerun_runtime_batch_size histogram",
                *self.runtime_batch.render("edgerun_runtime_batch_size"),
            ]
        for name, (help_text, value) in sorted(gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        for family in families:
            if family.samples:
                lines += family.render()
        if info:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(info.items()))
            lines += [
                "# HELP edgerun_model_info The model being served.",
                "# TYPE edgerun_model_info gauge",
                f"edgerun_model_info{{{labels}}} 1",
            ]
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
