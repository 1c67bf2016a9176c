"""Shadow evaluation on real models: the candidate beside the served one on live traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.admission import limits_from
from agent.protocol.update import ShadowSpec
from agent.service import Agent
from agent.serving import LoadedModel
from agent.update.ports import Verdict
from agent.update.shadow import ShadowEvaluator, _Run, cosine, top1_agreement
from tests.agent.test_admission import make_agent
from tests.agent.update.watch.candidates import (
    LiveTraffic,
    build_candidate,
    fails_above,
    nan_below,
    permuted,
    pixel_sums,
    slow,
)
from tests.helpers import SAMPLE_BUNDLE, SampleParts

HANG_GUARD_S = 120.0


@contextmanager
def loaded(agent: Agent, bundle: Path) -> Iterator[LoadedModel]:
    """The candidate as the job hands it over: verified, loaded, validated, not served."""
    verified = agent.store.install(bundle, agent.keys, limits_from(agent.config))
    assert verified.directory is not None
    model = agent.admission.open(verified.directory, verified.sha256, verified.manifest)
    try:
        yield model
    finally:
        model.runtime.close()


def evaluate(
    agent: Agent, candidate: LoadedModel, spec: ShadowSpec, live: np.ndarray | None
) -> tuple[Verdict, list[dict[str, float]]]:
    # Progress every 0.1 s: a quick evaluation (an idle box) still reports some.
    shadow = ShadowEvaluator(agent.host, progress_s=0.1)
    seen: list[dict[str, float]] = []
    before = agent.host._observers
    if live is None:
        verdict = shadow.evaluate(candidate, spec, threading.Event(), seen.append)
    else:
        with LiveTraffic(agent.host, live).running():
            verdict = shadow.evaluate(candidate, spec, threading.Event(), seen.append)
    assert agent.host._observers == before  # unregistered on every path
    assert not any(t.name == "shadow-worker" for t in threading.enumerate())
    assert shadow.figures() == verdict.figures  # what telemetry reports afterwards
    return verdict, seen


@pytest.mark.parametrize("metric", ["top1", "cosine"])
def test_same_model_is_accepted_with_full_agreement(
    metric: str,
    agent: Agent,
    live_images: np.ndarray,
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
) -> None:
    same = build_candidate(sample_parts, demo_key, tmp / "same", "1.0.1")
    with loaded(agent, same.bundle) as candidate:
        spec = ShadowSpec(sample=0.5, min_requests=40, metric=metric, timeout_s=HANG_GUARD_S)  # type: ignore[arg-type]
        verdict, _ = evaluate(agent, candidate, spec, live_images)
    assert verdict.ok, verdict.reason
    f = verdict.figures
    assert f["agreement"] == pytest.approx(1.0, abs=1e-6) and f["compared"] >= 40
    assert f["candidate_errors"] == 0
    assert f["offered"] >= f["sampled"] >= f["compared"]
    # Latency side by side, in the reason too.
    assert f["candidate_p95_ms"] > 0 and f["served_p95_ms"] > 0
    assert "beside the served" in verdict.reason
    assert agent.host.model is not None and agent.host.model.manifest.version == "1.0.0"


@pytest.mark.parametrize("kind", ["permuted", "errors", "nan-cosine"])
def test_disagreeing_candidate_is_refused(
    kind: str,
    agent: Agent,
    live_images: np.ndarray,
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
) -> None:
    sums = pixel_sums(live_images)
    median = float(np.median(sums))
    builds = {
        "permuted": (permuted, 5.0, None, "top1"),
        "errors": (fails_above, median, live_images[sums <= median][:16], "top1"),
        "nan-cosine": (nan_below, median, live_images[sums >= median][:16], "cosine"),
    }
    fault, arg, golden, metric = builds[kind]
    bad = build_candidate(sample_parts, demo_key, tmp / kind, "1.0.1", fault, arg, golden)
    with loaded(agent, bad.bundle) as candidate:
        spec = ShadowSpec(sample=1.0, min_requests=40, metric=metric, timeout_s=HANG_GUARD_S)  # type: ignore[arg-type]
        verdict, _ = evaluate(agent, candidate, spec, live_images)
    assert not verdict.ok and verdict.bound == "min_agreement", verdict.reason
    assert "under min_agreement 0.95" in verdict.reason
    f = verdict.figures
    assert f["compared"] >= 40 and f["agreement"] < 0.8
    if kind == "permuted":
        assert f["agreement"] < 0.05  # classes 0-4 sent, 5-9 answered
    if kind == "errors":
        assert f["candidate_errors"] > 0
    # The live answers still came from the served model.
    assert agent.host.model is not None and agent.host.model.manifest.version == "1.0.0"


def test_duty_cycle_caps_the_worker(
    live_images: np.ndarray, sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    # One intra-op thread: all the candidate's CPU is on the worker's own thread, so
    # the worker's CPU time (not the pacing's own estimate) measures its busy share.
    agent = make_agent(tmp, runtimes={"onnxruntime": {"intra_op_threads": 1}})
    agent.admission.install(SAMPLE_BUNDLE)
    try:
        heavy = build_candidate(sample_parts, demo_key, tmp / "slow", "1.0.1", slow, 300.0)
        with loaded(agent, heavy.bundle) as candidate:
            duty = 0.25
            spec = ShadowSpec(sample=1.0, duty_cycle=duty, min_requests=60, timeout_s=HANG_GUARD_S)
            verdict, seen = evaluate(agent, candidate, spec, live_images)
    finally:
        agent.host.close()
    assert verdict.ok, verdict.reason
    f = verdict.figures
    assert f["worker_cpu_s"] > 0.1  # enough work to measure a share
    share = f["worker_cpu_s"] / f["elapsed_s"]
    assert share <= duty * 1.5 + 0.02, f
    assert f["busy_s"] / f["elapsed_s"] <= duty * 1.05 + 0.01, f
    assert f["dropped"] > 0  # the queue filled while the worker paced: copies dropped
    assert seen  # progress while it ran (every progress_s)


def test_cancel_stops_at_once_and_no_traffic_times_out(
    agent: Agent, sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    same = build_candidate(sample_parts, demo_key, tmp / "same", "1.0.1")
    with loaded(agent, same.bundle) as candidate:
        shadow = ShadowEvaluator(agent.host)
        before = agent.host._observers
        cancel = threading.Event()
        out: list[Verdict] = []
        worker = threading.Thread(
            target=lambda: out.append(
                shadow.evaluate(candidate, ShadowSpec(timeout_s=600), cancel, lambda f: None)
            )
        )
        worker.start()
        time.sleep(0.3)
        cancel.set()
        worker.join(HANG_GUARD_S)
        assert not worker.is_alive()
        [verdict] = out
        assert not verdict.ok and verdict.bound == "cancelled"
        assert agent.host._observers == before
        verdict, _ = evaluate(agent, candidate, ShadowSpec(timeout_s=1, min_requests=5), None)
    assert not verdict.ok and verdict.bound == "timeout_s"
    assert verdict.reason.startswith("not enough live traffic: 0 of min_requests 5")
    assert "timeout_s 1" in verdict.reason


def test_a_failing_progress_callback_does_not_end_the_evaluation(
    agent: Agent,
    live_images: np.ndarray,
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
) -> None:
    same = build_candidate(sample_parts, demo_key, tmp / "same", "1.0.1")

    def broken(figures: dict[str, float]) -> None:
        raise RuntimeError("event sink down")

    before = agent.host._observers
    with loaded(agent, same.bundle) as candidate, LiveTraffic(agent.host, live_images).running():
        verdict = ShadowEvaluator(agent.host, progress_s=0.05).evaluate(
            candidate, ShadowSpec(sample=0.5, min_requests=30), threading.Event(), broken
        )
    assert verdict.ok and agent.host._observers == before


def test_sampled_requests_are_copies(agent: Agent) -> None:
    model = agent.host.model
    assert model is not None
    run = _Run(model, ShadowSpec(sample=1.0))
    buffer = np.ones((1, 1, 8, 8), np.float32)
    answer = {"logits": np.arange(10, dtype=np.float32)[None]}
    run.observe(1, model, {"input": buffer[:1]}, answer, None, 0.001)
    buffer[:] = 7  # the request buffer is reused after the reply
    answer["logits"][:] = 0
    sample = run.queue.get_nowait()
    assert (sample.feeds["input"] == 1).all() and sample.served["logits"][0, 9] == 9
    run.observe(1, model, {"input": buffer}, None, "runtime.failed", 0.001)  # failures: not sampled
    assert run.queue.empty() and run.offered == 1


def test_comparisons() -> None:
    a = {"y": np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)}
    b = {"y": np.array([[0.2, 0.7], [0.1, 0.9]], np.float32)}
    assert top1_agreement(a, b, "y") == (1.0, 2)
    assert top1_agreement(a, {"y": np.full((2, 2), np.nan, np.float32)}, "y") == (0.0, 2)
    assert top1_agreement(a, {"y": np.zeros((3, 2), np.float32)}, "y") == (0.0, 1)
    assert cosine(a, a, ["y"]) == pytest.approx(1.0)
    assert cosine(a, {"y": -a["y"]}, ["y"]) == pytest.approx(-1.0)
    assert cosine(a, {"y": np.full((2, 2), np.inf, np.float32)}, ["y"]) == 0.0
    assert cosine(a, {}, ["y"]) == 0.0
