"""The ML watchdog: live-traffic figures per generation, and the trial after a swap.

`TrafficRecorder` is a `RequestObserver` registered on the `ModelHost` at start and
the one owner of live-traffic figures: per generation, request and error counts (by
code), a latency histogram (p50/p95), non-finite or empty answers, the top-1 class
mix of a classifier, and the RSS when the generation was first seen. Each generation
keeps its whole-life totals (what a trial judges) and a rolling recent window of two
`span_s` buckets (what `baseline()` reports: "the previous model on this device,
lately").

`Watchdog` is the `TrialMonitor`: `watch()` blocks while the swapped-in generation
serves for the trial window and returns at once when a bound is crossed. The rules,
each needing enough evidence so that noise on a small sample is not a rollback:

- error rate / non-finite rate: at least `MIN_EVENTS` (3) bad answers AND the 95%
  Wilson lower bound of the bad share above the bound (one error in 3 requests is
  not a breach; 30 in 100 against a bound of 0.02 is);
- p95: at least `MIN_LATENCY_SAMPLES` on both sides; the ratio is taken against
  max(previous p95, `P95_FLOOR_MS`): sub-millisecond jitter of a tiny model is
  scheduler noise, not a regression worth a rollback;
- RSS: growth since the watch began (right after the swap) above `max_rss_growth_mb`;
- drift: total variation distance of the top-1 class mix against the previous
  model's, with at least `MIN_DRIFT_SAMPLES` classified rows on both sides.

Fewer than `min_requests` requests at the end of the window: the window is extended
up to 3x, then the trial commits on what was seen and says so (`short_of_requests`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from agent.memory import MB, current_rss
from agent.protocol.update import TrialSpec
from agent.update.ports import Verdict

if TYPE_CHECKING:
    from agent.runtimes.base import Feeds
    from agent.serving import LoadedModel, ModelHost

log = logging.getLogger(__name__)

MIN_EVENTS = 3
WILSON_Z = 1.96
MIN_LATENCY_SAMPLES = 20
MIN_DRIFT_SAMPLES = 30
P95_FLOOR_MS = 2.0  # see the rules above: a few ms of jitter on a busy 2-core board is common
EXTEND_FACTOR = 3.0
KEEP_GENERATIONS = 4
REAL_KINDS = "fiub"  # dtype kinds whose values order: argmax means a class  # old generations' figures are dropped beyond this many

# Latency histogram: log-spaced buckets 4% apart from 10 µs to ~100 s (a quantile
# read from it is within 2% of the true value); mergeable, fixed size, no sorting.
_LAT_MIN_S = 1e-5
_LAT_STEP = 1.04
_LOG_STEP = math.log(_LAT_STEP)
LATENCY_BUCKETS = int(math.log(1e7) / _LOG_STEP) + 2


def latency_bucket(seconds: float) -> int:
    if seconds <= _LAT_MIN_S:
        return 0
    return min(LATENCY_BUCKETS - 1, int(math.log(seconds / _LAT_MIN_S) / _LOG_STEP) + 1)


def quantile_ms(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a latency histogram in ms; None when it is empty."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if seen >= rank and count:
            if i == 0:
                return _LAT_MIN_S * 1e3
            return float(_LAT_MIN_S * _LAT_STEP ** (i - 0.5) * 1e3)  # the bucket's geometric middle
    return float(_LAT_MIN_S * _LAT_STEP ** (LATENCY_BUCKETS - 1) * 1e3)


def wilson_lower(bad: int, n: int, z: float = WILSON_Z) -> float:
    """Lower end of the Wilson score interval of the share bad/n."""
    if n <= 0:
        return 0.0
    p = bad / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


@dataclass
class _Window:
    """Counts over one stretch of one generation's traffic."""

    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    nonfinite: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    top1: list[int] | None = None  # counts per class index, classifiers only

    def add(self, other: _Window) -> None:
        self.requests += other.requests
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.nonfinite += other.nonfinite
        self.latency = [a + b for a, b in zip(self.latency, other.latency, strict=True)]
        if other.top1 is not None:
            mine = self.top1 or [0] * len(other.top1)
            self.top1 = [a + b for a, b in zip(mine, other.top1, strict=True)]

    def copy(self) -> _Window:
        out = _Window()
        out.add(self)
        return out


def classifier_output(model: LoadedModel) -> tuple[str, int] | None:
    """(output name, class count) when the model is a classifier: it has labels and
    exactly one output whose last axis has that many entries; else None."""
    classes = len(model.manifest.labels)
    if classes < 2:
        return None
    matching = [o.name for o in model.manifest.outputs if o.shape and o.shape[-1] == classes]
    return (matching[0], classes) if len(matching) == 1 else None


def answer_is_bad(outputs: Feeds) -> bool:
    """An answer with an empty output or a NaN/inf anywhere in a float (or complex) output.

    A NaN or inf anywhere makes the sum NaN or inf, so a finite sum (one pass, no
    temporary array: the per-request fast path) proves every value finite; only a
    non-finite sum, which huge finite float64 values can also give, is checked value
    by value."""
    if not outputs:
        return True
    for array in outputs.values():
        if array.size == 0:
            return True
        kind = array.dtype.kind
        if kind not in "fc":
            continue
        # float64 accumulation: finite float16/32 values cannot overflow the sum.
        total = array.sum(dtype=np.float64) if array.dtype.itemsize < 8 else array.sum()
        if not np.isfinite(total):
            with np.errstate(all="ignore"):
                if not np.isfinite(array).all():
                    return True
    return False


def _top1(outputs: Feeds, output: str, classes: int) -> list[int] | int | None:
    """The winning class of a one-row answer, or the count per class of a batch."""
    array = outputs.get(output)
    if array is None or array.ndim < 1 or array.shape[-1] != classes or array.size == 0:
        return None
    if array.dtype.kind not in REAL_KINDS:  # strings, objects, complex: no class order
        return None
    if array.size == classes:
        return int(array.argmax())
    winners = array.reshape(-1, classes).argmax(axis=1)
    return [int(n) for n in np.bincount(winners, minlength=classes)[:classes]]


class _Traffic:
    """One generation's figures (guarded by the recorder's lock)."""

    def __init__(self, number: int, model: LoadedModel, rss: int, now: float, span_s: float):
        self.number = number
        self.name = model.manifest.name
        self.version = model.manifest.version
        self.sha256 = model.sha256
        self.labels = model.manifest.labels
        self.classifier = classifier_output(model)
        self.rss_at_start = rss
        self.started = now
        self.span_s = span_s
        # A request counts in the current span only (one window to update); what
        # leaves the recent pair is folded into `older`, so the whole life is the sum.
        self.older = _Window()
        self.recent = [_Window(), _Window()]  # [previous span, current span]
        self.span_started = now

    def current(self, now: float) -> _Window:
        if now - self.span_started >= self.span_s:
            spans = int((now - self.span_started) // self.span_s)
            self.older.add(self.recent[0])
            if spans == 1:
                self.recent = [self.recent[1], _Window()]
            else:
                self.older.add(self.recent[1])
                self.recent = [_Window(), _Window()]
            self.span_started += spans * self.span_s
        return self.recent[1]

    def total(self) -> _Window:
        out = self.older.copy()
        out.add(self.recent[0])
        out.add(self.recent[1])
        return out


class TrafficRecorder:
    """The one owner of live-traffic figures per generation (a `RequestObserver`).

    `observe` runs on every request's thread: a few numpy reductions over the
    outputs outside the lock, then a handful of counter increments under it."""

    def __init__(
        self,
        host: ModelHost,
        span_s: float = 300.0,
        rss: Callable[[], int] = current_rss,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.span_s = span_s
        self.rss = rss
        self.clock = clock
        self._lock = threading.Lock()
        self._generations: dict[int, _Traffic] = {}

    def start(self) -> None:
        self.host.add_observer(self)

    def stop(self) -> None:
        self.host.remove_observer(self)

    # ------------------------------------------------------------------ RequestObserver

    def observe(
        self,
        generation: int,
        model: LoadedModel,
        feeds: Feeds,
        outputs: Feeds | None,
        error: str | None,
        seconds: float,
    ) -> None:
        traffic = self._generations.get(generation)
        if traffic is None:
            traffic = self._new(generation, model)
        bad = False
        top1 = None
        if outputs is not None:
            bad = answer_is_bad(outputs)
            if traffic.classifier is not None:
                top1 = _top1(outputs, *traffic.classifier)
        bucket = latency_bucket(seconds)
        now = self.clock()
        with self._lock:
            window = traffic.current(now)
            window.requests += 1
            if error is not None:
                window.errors[error] = window.errors.get(error, 0) + 1
            else:
                window.latency[bucket] += 1
            if bad:
                window.nonfinite += 1
            if top1 is not None:
                assert traffic.classifier is not None
                counts = window.top1
                if counts is None:
                    counts = window.top1 = [0] * traffic.classifier[1]
                if isinstance(top1, int):
                    counts[top1] += 1
                else:
                    for i, n in enumerate(top1):
                        counts[i] += n

    def _new(self, number: int, model: LoadedModel) -> _Traffic:
        rss = self.rss()
        with self._lock:
            traffic = self._generations.get(number)
            if traffic is None:
                traffic = _Traffic(number, model, rss, self.clock(), self.span_s)
                self._generations[number] = traffic
                for old in sorted(self._generations)[:-KEEP_GENERATIONS]:
                    del self._generations[old]
            return traffic

    # ------------------------------------------------------------------ figures

    def figures(self, generation: int | None = None, recent: bool = True) -> dict[str, float]:
        """Figures of the model serving as `generation` (default: the one served now).

        `recent`: over the recent window of every kept generation of the same model
        (a runtime rebuilt to give back memory, or a batching change, is a new
        generation of the same model); else over the whole life of `generation` and
        the later generations of the same model. Empty before it answered a request."""
        number = self.host.generation if generation is None else generation
        with self._lock:
            traffic = self._generations.get(number)
            if traffic is None:
                return {}
            now = self.clock()
            window = _Window()
            rss = traffic.rss_at_start
            for n, other in self._generations.items():
                if other.sha256 != traffic.sha256 or (not recent and n < number):
                    continue
                other.current(now)  # rotates the spans of a generation no longer answering
                if recent:
                    window.add(other.recent[0])
                    window.add(other.recent[1])
                else:
                    window.add(other.total())
                rss = min(rss, other.rss_at_start)
            classifier = traffic.classifier
        out = window_figures(window, classifier[1] if classifier else 0)
        out["generation"] = float(number)
        out["rss_at_start_mb"] = round(rss / MB, 1)
        return out

    def baseline(self) -> dict[str, float]:
        """The served generation's recent figures: what a candidate is compared to."""
        return self.figures(recent=True)

    def forget(self, generation: int) -> None:
        with self._lock:
            self._generations.pop(generation, None)


def window_figures(window: _Window, classes: int) -> dict[str, float]:
    n = window.requests
    errors = sum(window.errors.values())
    out: dict[str, float] = {
        "requests": float(n),
        "errors": float(errors),
        "error_rate": errors / n if n else 0.0,
        "nonfinite": float(window.nonfinite),
        "nonfinite_rate": window.nonfinite / n if n else 0.0,
        "latency_samples": float(sum(window.latency)),
    }
    for code, count in sorted(window.errors.items()):
        out[f"errors.{code}"] = float(count)
    p50, p95 = quantile_ms(window.latency, 0.5), quantile_ms(window.latency, 0.95)
    if p50 is not None and p95 is not None:
        out["p50_ms"] = round(p50, 4)
        out["p95_ms"] = round(p95, 4)
    if classes and window.top1 is not None:
        rows = sum(window.top1)
        out["top1_samples"] = float(rows)
        if rows:
            for i, count in enumerate(window.top1):
                out[f"top1.{i}"] = count / rows
    return out


def top1_mix(figures: dict[str, float]) -> dict[int, float]:
    return {int(k[5:]): v for k, v in figures.items() if k.startswith("top1.")}


def total_variation(a: dict[int, float], b: dict[int, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@dataclass(frozen=True)
class Breach:
    bound: str
    reason: str


def judge(
    figures: dict[str, float], baseline: dict[str, float], spec: TrialSpec, rss_growth_mb: float
) -> Breach | None:
    """The first bound `figures` cross (see the module docstring for the rules)."""
    n = int(figures.get("requests", 0))
    errors = int(figures.get("errors", 0))
    if errors >= MIN_EVENTS and wilson_lower(errors, n) > spec.max_error_rate:
        codes = ", ".join(
            f"{k[7:]} x{int(v)}" for k, v in sorted(figures.items()) if k.startswith("errors.")
        )
        return Breach(
            "max_error_rate",
            f"{errors} of {n} requests failed ({errors / n:.1%}: {codes}); "
            f"more than max_error_rate {spec.max_error_rate:g} even at the 95% lower bound "
            f"({wilson_lower(errors, n):.1%})",
        )
    bad = int(figures.get("nonfinite", 0))
    if bad >= MIN_EVENTS and wilson_lower(bad, n) > spec.max_nonfinite_rate:
        return Breach(
            "max_nonfinite_rate",
            f"{bad} of {n} answers had NaN/inf or empty outputs ({bad / n:.1%}); more than "
            f"max_nonfinite_rate {spec.max_nonfinite_rate:g} even at the 95% lower bound "
            f"({wilson_lower(bad, n):.1%})",
        )
    if rss_growth_mb > spec.max_rss_growth_mb:
        return Breach(
            "max_rss_growth_mb",
            f"RSS grew {rss_growth_mb:.1f} MB since the swap "
            f"(max_rss_growth_mb {spec.max_rss_growth_mb:g})",
        )
    p95, base = figures.get("p95_ms"), baseline.get("p95_ms")
    if (
        p95 is not None
        and base is not None
        and figures.get("latency_samples", 0) >= MIN_LATENCY_SAMPLES
        and baseline.get("latency_samples", 0) >= MIN_LATENCY_SAMPLES
    ):
        ratio = p95 / max(base, P95_FLOOR_MS)
        if ratio > spec.max_p95_ratio:
            floor = f", taken as {P95_FLOOR_MS:g} ms at least" if base < P95_FLOOR_MS else ""
            return Breach(
                "max_p95_ratio",
                f"p95 {p95:.1f} ms is {ratio:.1f}x the previous model's {base:.1f} ms{floor} "
                f"(max_p95_ratio {spec.max_p95_ratio:g})",
            )
    drift = figures.get("drift")
    if drift is not None and drift > spec.max_drift:
        return Breach(
            "max_drift",
            f"top-1 class mix moved {drift:.2f} (total variation distance) from the previous "
            f"model's over {int(figures['top1_samples'])} answers (max_drift {spec.max_drift:g})",
        )
    return None


class Watchdog:
    """The `TrialMonitor`: judges a swapped-in generation on the recorder's figures."""

    def __init__(
        self,
        recorder: TrafficRecorder,
        rss: Callable[[], int] | None = None,
        tick_s: float = 0.1,
        progress_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recorder = recorder
        self.rss = rss or recorder.rss
        self.tick_s = tick_s
        self.progress_s = progress_s
        self.clock = clock

    def baseline(self) -> dict[str, float]:
        return self.recorder.baseline()

    def figures(self) -> dict[str, float]:
        """The served model's recent live-traffic figures (telemetry `model.live`)."""
        return self.recorder.baseline()

    def watch(
        self,
        generation: int,
        spec: TrialSpec,
        baseline: dict[str, float],
        cancel: threading.Event,
        progress: Callable[[dict[str, float]], None],
    ) -> Verdict:
        start = self.clock()
        rss0 = self.rss()
        figures = self._figures(generation, baseline, rss0, start)
        host = self.recorder.host
        served = host.model
        if host.generation != generation or served is None:
            return Verdict(
                False,
                f"generation {generation} is not served (now {host.generation})",
                figures,
                "served",
            )
        sha = served.sha256
        if spec.window_s <= 0:
            return Verdict(True, "no trial (window_s 0): committed at once", figures)
        next_progress = start + self.progress_s
        while True:
            figures = self._figures(generation, baseline, rss0, start)
            breach = judge(figures, baseline, spec, figures["rss_growth_mb"])
            if breach is not None:
                return Verdict(False, f"{breach.bound}: {breach.reason}", figures, breach.bound)
            # A new generation of the same model (runtime rebuilt, batching changed)
            # goes on with the trial; another model served means someone else swapped.
            now_serving = host.model
            if now_serving is not None and now_serving.sha256 != sha:
                return Verdict(
                    False,
                    f"generation {generation} is no longer served: "
                    f"{now_serving.manifest.name} {now_serving.manifest.version} is "
                    f"(generation {host.generation})",
                    figures,
                    "served",
                )
            now = self.clock()
            elapsed = now - start
            n = int(figures["requests"])
            if elapsed >= spec.window_s and n >= spec.min_requests:
                return Verdict(
                    True, f"no bound crossed in {elapsed:.1f} s over {n} requests", figures
                )
            if elapsed >= spec.window_s * EXTEND_FACTOR:
                figures["short_of_requests"] = float(spec.min_requests - n)
                return Verdict(
                    True,
                    f"no bound crossed; committed on {n} requests, fewer than min_requests "
                    f"{spec.min_requests}, after the window was extended to {elapsed:.1f} s "
                    f"({EXTEND_FACTOR:g}x window_s)",
                    figures,
                )
            if now >= next_progress:
                next_progress = now + self.progress_s
                try:
                    progress(figures)
                except Exception:  # a failing event sink must not end the trial
                    log.exception("trial progress callback failed")
            if cancel.wait(self.tick_s):
                return Verdict(False, "cancelled during the trial", figures, "cancelled")

    def _figures(
        self, generation: int, baseline: dict[str, float], rss0: int, start: float
    ) -> dict[str, float]:
        figures = self.recorder.figures(generation, recent=False)
        if not figures:
            figures = window_figures(_Window(), 0)
            figures["generation"] = float(generation)
        n = int(figures["requests"])
        figures["error_lower"] = wilson_lower(int(figures["errors"]), n)
        figures["nonfinite_lower"] = wilson_lower(int(figures["nonfinite"]), n)
        rss = self.rss()
        figures["rss_mb"] = round(rss / MB, 1)
        figures["rss_growth_mb"] = round((rss - rss0) / MB, 1)
        figures["elapsed_s"] = round(self.clock() - start, 2)
        if "p95_ms" in baseline:
            figures["baseline_p95_ms"] = baseline["p95_ms"]
            if "p95_ms" in figures:
                figures["p95_ratio"] = round(
                    figures["p95_ms"] / max(baseline["p95_ms"], P95_FLOOR_MS), 3
                )
        mine, theirs = top1_mix(figures), top1_mix(baseline)
        if (
            mine
            and theirs
            and figures.get("top1_samples", 0) >= MIN_DRIFT_SAMPLES
            and baseline.get("top1_samples", 0) >= MIN_DRIFT_SAMPLES
        ):
            figures["drift"] = round(total_variation(mine, theirs), 4)
        return figures


__all__ = [
    "Breach",
    "TrafficRecorder",
    "Watchdog",
    "answer_is_bad",
    "classifier_output",
    "judge",
    "latency_bucket",
    "quantile_ms",
    "total_variation",
    "wilson_lower",
]
