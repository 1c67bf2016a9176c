"""The trial after a swap, on real models serving real traffic through ModelHost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.memory import MB
from agent.protocol.update import TrialSpec
from agent.service import Agent
from agent.update.trial import (
    TrafficRecorder,
    Watchdog,
    judge,
    quantile_ms,
    wilson_lower,
)
from agent.update.trial import (
    latency_bucket as bucket,
)
from tests.agent.update.watch.candidates import (
    LiveTraffic,
    build_candidate,
    fails_above,
    grows_above,
    nan_below,
    permuted,
    pixel_sums,
    slow,
)
from tests.helpers import SampleParts

# Latency bound of these tests: generous, since a loaded 2-core CI box makes p95
# of a sub-millisecond model jumpy; the slow candidate is ~500x slower.
P95_RATIO = 10.0
HANG_GUARD_S = 120.0


def wait_for(predicate, timeout_s: float = HANG_GUARD_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out (hang guard)"
        time.sleep(0.02)


def baseline_of(recorder: TrafficRecorder, requests: int = 80) -> dict[str, float]:
    wait_for(lambda: recorder.baseline().get("requests", 0) >= requests)
    return recorder.baseline()


def run_trial(
    agent: Agent,
    live: np.ndarray,
    candidate: Path,
    spec: TrialSpec,
    recorder: TrafficRecorder | None = None,
) -> tuple[object, dict[str, float], list[dict[str, float]]]:
    recorder = recorder or TrafficRecorder(agent.host)
    recorder.start()
    watchdog = Watchdog(recorder)
    seen: list[dict[str, float]] = []
    try:
        with LiveTraffic(agent.host, live).running():
            baseline = baseline_of(recorder)
            agent.admission.install(candidate)
            verdict = watchdog.watch(
                agent.host.generation, spec, baseline, threading.Event(), seen.append
            )
    finally:
        recorder.stop()
    return verdict, baseline, seen


def spec(**changes: float) -> TrialSpec:
    values: dict[str, float] = {
        "window_s": HANG_GUARD_S,
        "min_requests": 20,
        "max_p95_ratio": P95_RATIO,
    }
    values.update(changes)
    return TrialSpec(**values)  # type: ignore[arg-type]


def test_good_candidate_passes_and_progress_is_reported(
    agent: Agent,
    live_images: np.ndarray,
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
) -> None:
    good = build_candidate(sample_parts, demo_key, tmp / "good", "1.0.1")
    verdict, baseline, seen = run_trial(
        agent, live_images, good.bundle, spec(window_s=2.5, min_requests=20)
    )
    assert verdict.ok, verdict.reason  # type: ignore[attr-defined]
    figures = verdict.figures  # type: ignore[attr-defined]
    assert figures["requests"] >= 20 and figures["errors"] == 0 and figures["nonfinite"] == 0
    assert figures["drift"] < 0.25 and "p95_ms" in figures and "p95_ratio" in figures
    assert baseline["top1_samples"] >= 30 and baseline["errors"] == 0
    # Only classes 0-4 are sent; the served model answers them.
    assert sum(baseline.get(f"top1.{i}", 0) for i in range(5)) > 0.9
    assert seen and all("requests" in f for f in seen)  # about one a second


@pytest.mark.parametrize(
    ("kind", "bound"),
    [
        ("nan", "max_nonfinite_rate"),
        ("errors", "max_error_rate"),
        ("slow", "max_p95_ratio"),
        ("permuted", "max_drift"),
        ("grows", "max_rss_growth_mb"),
    ],
)
def test_bad_candidate_breaches_its_bound_at_once(
    kind: str,
    bound: str,
    agent: Agent,
    live_images: np.ndarray,
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
) -> None:
    sums = pixel_sums(live_images)
    low, high = float(np.percentile(sums, 30)), float(np.percentile(sums, 70))
    builds = {
        "nan": (nan_below, low, live_images[sums >= low][:16]),
        "errors": (fails_above, high, live_images[sums <= high][:16]),
        "slow": (slow, 3000.0, None),
        "permuted": (permuted, 5.0, None),
        "grows": (grows_above, high, live_images[sums <= high][:16]),
    }
    fault, arg, golden = builds[kind]
    bad = build_candidate(sample_parts, demo_key, tmp / kind, "1.0.1", fault, arg, golden)
    # Filling a scratch tensor of tens of MB takes milliseconds too: the memory case
    # is judged on its own bound.
    ratio = 1000.0 if kind == "grows" else P95_RATIO
    verdict, _, _ = run_trial(
        agent, live_images, bad.bundle, spec(max_rss_growth_mb=32.0, max_p95_ratio=ratio)
    )
    assert not verdict.ok  # type: ignore[attr-defined]
    assert verdict.bound == bound, verdict.reason  # type: ignore[attr-defined]
    reason: str = verdict.reason  # type: ignore[attr-defined]
    assert reason.startswith(bound) and bound in reason.split(": ", 1)[1]
    figures = verdict.figures  # type: ignore[attr-defined]
    # At once: long before the window's end (a hang guard, not a speed figure).
    assert figures["elapsed_s"] < HANG_GUARD_S
    for key in ("requests", "error_rate", "nonfinite_rate", "rss_growth_mb"):
        assert key in figures
    if kind == "slow":
        assert figures["p95_ratio"] > P95_RATIO
    if kind == "grows":
        assert figures["rss_growth_mb"] > 32


def test_too_few_requests_extends_the_window_then_commits_saying_so(agent: Agent) -> None:
    recorder = TrafficRecorder(agent.host)
    recorder.start()
    try:
        images = np.zeros((1, 1, 8, 8), np.float32)
        for _ in range(3):
            agent.host.infer("digits", {"input": images})
        verdict = Watchdog(recorder, tick_s=0.02).watch(
            agent.host.generation,
            TrialSpec(window_s=0.3, min_requests=20),
            {},
            threading.Event(),
            lambda f: None,
        )
    finally:
        recorder.stop()
    assert verdict.ok and "fewer than min_requests 20" in verdict.reason
    assert verdict.figures["short_of_requests"] == 17 and verdict.figures["requests"] == 3
    assert verdict.figures["elapsed_s"] >= 0.9  # extended to 3x the window


def test_cancel_and_a_generation_swapped_away_end_the_trial(
    agent: Agent, sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    recorder = TrafficRecorder(agent.host)
    watchdog = Watchdog(recorder)
    cancel = threading.Event()
    out: list[object] = []
    worker = threading.Thread(
        target=lambda: out.append(
            watchdog.watch(agent.host.generation, spec(), {}, cancel, lambda f: None)
        )
    )
    worker.start()
    time.sleep(0.3)
    cancel.set()
    worker.join(HANG_GUARD_S)
    assert not worker.is_alive()
    [verdict] = out
    assert not verdict.ok and verdict.bound == "cancelled"  # type: ignore[attr-defined]
    generation = agent.host.generation
    other = build_candidate(sample_parts, demo_key, tmp / "other", "1.0.1")
    agent.admission.install(other.bundle)
    verdict = watchdog.watch(generation, spec(), {}, threading.Event(), lambda f: None)
    assert not verdict.ok and verdict.bound == "served"
    assert f"generation {generation} is not served (now {generation + 1})" in verdict.reason
    # Swapped away during the watch.
    out.clear()
    generation = agent.host.generation
    watching = threading.Event()
    worker = threading.Thread(
        target=lambda: out.append(
            Watchdog(recorder, progress_s=0.01).watch(
                generation, spec(), {}, threading.Event(), lambda f: watching.set()
            )
        )
    )
    worker.start()
    assert watching.wait(HANG_GUARD_S)
    third = build_candidate(sample_parts, demo_key, tmp / "third", "1.0.2")
    agent.admission.install(third.bundle)
    worker.join(HANG_GUARD_S)
    [verdict] = out
    assert not verdict.ok and verdict.bound == "served"
    assert f"generation {generation} is no longer served: digits 1.0.2 is" in verdict.reason


def test_a_rebuilt_runtime_of_the_same_model_goes_on_with_the_trial(agent: Agent) -> None:
    recorder = TrafficRecorder(agent.host)
    recorder.start()
    images = np.zeros((1, 1, 8, 8), np.float32)
    out: list[object] = []
    try:
        generation = agent.host.generation
        watchdog = Watchdog(recorder, tick_s=0.02, progress_s=0.01)
        watching = threading.Event()
        worker = threading.Thread(
            target=lambda: out.append(
                watchdog.watch(
                    generation,
                    TrialSpec(window_s=1.0, min_requests=6),
                    {},
                    threading.Event(),
                    lambda f: watching.set(),
                )
            )
        )
        worker.start()
        assert watching.wait(HANG_GUARD_S)
        for _ in range(3):
            agent.host.infer("digits", {"input": images})
        assert agent.host.reclaim()  # a fresh runtime of the same model: generation + 1
        assert agent.host.generation == generation + 1
        for _ in range(3):
            agent.host.infer("digits", {"input": images})
        worker.join(HANG_GUARD_S)
    finally:
        recorder.stop()
    [verdict] = out
    assert verdict.ok, verdict.reason  # type: ignore[attr-defined]
    assert verdict.figures["requests"] == 6  # type: ignore[attr-defined]
    # The baseline spans both generations of the model too.
    assert recorder.baseline()["requests"] == 6


def test_rss_bound_reads_the_injected_rss() -> None:
    class Model:
        sha256 = "a" * 64

    class Host:
        generation = 1
        model = Model()

    readings = iter([100 * MB, 100 * MB, 100 * MB, 180 * MB])
    recorder = TrafficRecorder(Host(), rss=lambda: next(readings, 180 * MB))  # type: ignore[arg-type]
    verdict = Watchdog(recorder, tick_s=0.01).watch(
        1, TrialSpec(window_s=60, max_rss_growth_mb=64), {}, threading.Event(), lambda f: None
    )
    assert not verdict.ok and verdict.bound == "max_rss_growth_mb"
    assert "RSS grew 80.0 MB since the swap (max_rss_growth_mb 64)" in verdict.reason


def test_error_rule_needs_evidence() -> None:
    bounds = TrialSpec(max_error_rate=0.02)
    # One error in 3 requests is not a breach; nor 2 in 10.
    assert judge({"requests": 3, "errors": 1}, {}, bounds, 0) is None
    assert judge({"requests": 10, "errors": 2}, {}, bounds, 0) is None
    # 3 in 1000 is 0.3%: under the bound.
    assert judge({"requests": 1000, "errors": 3}, {}, bounds, 0) is None
    breach = judge({"requests": 20, "errors": 6, "errors.runtime.failed": 6}, {}, bounds, 0)
    assert breach is not None and breach.bound == "max_error_rate"
    assert "6 of 20 requests failed (30.0%: runtime.failed x6)" in breach.reason
    assert 0 < wilson_lower(6, 20) < 0.3 and wilson_lower(0, 20) == 0


def test_p95_rule_needs_samples_on_both_sides_and_floors_the_baseline() -> None:
    bounds = TrialSpec(max_p95_ratio=2.0)
    few = {"requests": 5, "latency_samples": 5, "p95_ms": 100.0}
    base = {"latency_samples": 100, "p95_ms": 13.3}
    assert judge(few, base, bounds, 0) is None
    many = {"requests": 50, "latency_samples": 50, "p95_ms": 41.2}
    assert judge(many, {"latency_samples": 5, "p95_ms": 13.3}, bounds, 0) is None
    breach = judge(many, base, bounds, 0)
    assert breach is not None
    assert breach.reason == "p95 41.2 ms is 3.1x the previous model's 13.3 ms (max_p95_ratio 2)"
    # 0.3 ms against 0.05 ms is scheduler noise: the baseline counts as 1 ms.
    tiny = {"requests": 50, "latency_samples": 50, "p95_ms": 0.3}
    assert judge(tiny, {"latency_samples": 100, "p95_ms": 0.05}, bounds, 0) is None


def test_latency_histogram_quantiles_are_within_two_percent() -> None:
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=-6, sigma=1.0, size=5000)
    hist = [0] * (bucket(1e3) + 1)
    for s in samples:
        hist[bucket(float(s))] += 1
    for q in (0.5, 0.95):
        got = quantile_ms(hist, q)
        assert got is not None
        want = float(np.quantile(samples, q)) * 1e3
        assert abs(got - want) / want < 0.03
    assert quantile_ms([0] * 10, 0.5) is None


def test_recorder_keeps_figures_per_generation_and_bounded(agent: Agent) -> None:
    recorder = TrafficRecorder(agent.host)
    recorder.start()
    images = np.zeros((1, 1, 8, 8), np.float32)
    try:
        first = agent.host.generation
        for _ in range(5):
            agent.host.infer("digits", {"input": images})
        model = agent.host.model
        assert model is not None
        for _ in range(6):
            agent.host.swap(model)  # new generations of the same model
            agent.host.infer("digits", {"input": images})
    finally:
        recorder.stop()
    # Recent figures span the kept generations of the same model; a generation's
    # own life is its requests and those of later generations of the same model.
    recent = recorder.figures()
    assert recent["requests"] == 4 and recent["generation"] == agent.host.generation
    now = recorder.figures(agent.host.generation, recent=False)
    assert now["requests"] == 1
    assert recorder.figures(agent.host.generation - 1, recent=False)["requests"] == 2
    assert recorder.figures(first) == {}  # dropped: only the last 4 are kept
    assert len(recorder._generations) == 4
    assert now["top1_samples"] == 1 and now["top1.0"] + sum(
        now.get(f"top1.{i}", 0) for i in range(1, 10)
    ) == pytest.approx(1.0)
