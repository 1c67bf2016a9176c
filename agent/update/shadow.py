"""Shadow evaluation: the candidate beside the served model, on a sample of live requests.

`ShadowEvaluator.evaluate` registers an observer on the `ModelHost` that copies a
`sample` share of answered requests (their feeds, which may be views into a request
buffer, and the served answer) onto a bounded queue; when the queue is full the copy
is dropped and counted, so a request never waits for the shadow. One worker thread
runs the candidate on them and compares its answer with the served one:

- `top1`: the share of rows whose argmax over the last axis agrees, on the labelled
  output (`trial.classifier_output`), else on the first output both models name;
- `cosine`: the mean cosine similarity of the outputs both models name, flattened.

A candidate that fails on a request, answers NaN/inf, a shape the served model does
not, or values without an order (complex, strings), disagrees on that request (counted in `candidate_errors` / compared).

CPU budget: the worker counts a candidate run as busy for its wall time times the
runtime's thread count (an upper bound of the CPU it took), and after each run sleeps
so that busy / elapsed stays at most `duty_cycle` of one core; live answers never wait
for it. It stops at `min_requests` compared (ok when agreement >= `min_agreement`),
at `timeout_s` (not enough traffic: not ok, saying so) or on cancel, and on every path
unregisters its observer and stops its thread. The candidate is a loaded model that
is not served; its owner (the job) closes it, never this module.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.protocol.update import ShadowSpec
from agent.update.ports import Verdict
from agent.update.trial import (
    LATENCY_BUCKETS,
    REAL_KINDS,
    classifier_output,
    latency_bucket,
    quantile_ms,
)

if TYPE_CHECKING:
    from agent.runtimes.base import Feeds, Runtime
    from agent.serving import LoadedModel, ModelHost

log = logging.getLogger(__name__)

QUEUE_DEPTH = 64


@dataclass
class _Sample:
    feeds: Feeds
    served: Feeds
    served_s: float


def runtime_threads(runtime: Runtime) -> int:
    """How many threads one run of `runtime` may keep busy (its configured intra-op
    threads; ONNX Runtime's 0 means one per physical core)."""
    config: Any = getattr(runtime, "config", None)
    for attr in ("intra_op_threads", "threads"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:  # psutil cannot read the topology on some boards
        cores = None
    return max(1, cores or os.cpu_count() or 1)


def top1_agreement(served: Feeds, candidate: Feeds, output: str) -> tuple[float, int]:
    """(agreeing rows, rows) of the argmax over the last axis of `output`."""
    a, b = served.get(output), candidate.get(output)
    if a is None or b is None or a.shape != b.shape or a.size == 0 or a.ndim < 1:
        return 0.0, 1
    if a.dtype.kind not in REAL_KINDS or b.dtype.kind not in REAL_KINDS:
        return 0.0, max(1, a.size // max(1, a.shape[-1]))
    rows = a.size // a.shape[-1]
    same = a.reshape(rows, -1).argmax(axis=1) == b.reshape(rows, -1).argmax(axis=1)
    if b.dtype.kind == "f":
        same &= np.isfinite(b.reshape(rows, -1)).all(axis=1)
    return float(same.sum()), rows


def cosine(served: Feeds, candidate: Feeds, names: list[str]) -> float:
    """Cosine similarity of the named outputs, flattened together; 0 on any mismatch."""
    parts_a, parts_b = [], []
    for name in names:
        a, b = served.get(name), candidate.get(name)
        if a is None or b is None or a.shape != b.shape:
            return 0.0
        if a.dtype.kind not in REAL_KINDS or b.dtype.kind not in REAL_KINDS:
            return 0.0
        parts_a.append(np.asarray(a, np.float64).ravel())
        parts_b.append(np.asarray(b, np.float64).ravel())
    if not parts_a:
        return 0.0
    va, vb = np.concatenate(parts_a), np.concatenate(parts_b)
    na, nb = float(np.linalg.norm(va)), float(np.linalg.norm(vb))
    if not (math.isfinite(na) and math.isfinite(nb)):
        return 0.0
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    value = float(va @ vb) / (na * nb)
    return value if math.isfinite(value) else 0.0


@dataclass
class _Run:
    """One evaluation's state: the sampler (request threads) and the worker share it."""

    candidate: LoadedModel
    spec: ShadowSpec
    queue: queue.Queue[_Sample] = field(default_factory=lambda: queue.Queue(QUEUE_DEPTH))
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    offered: int = 0  # answered live requests seen
    sampled: int = 0
    dropped: int = 0  # sampled but the queue was full
    compared: int = 0
    candidate_errors: int = 0
    agree: float = 0.0  # top1: agreeing rows; cosine: sum of per-request cosines
    rows: int = 0  # top1: rows compared; cosine: requests compared
    busy_s: float = 0.0
    worker_cpu_s: float = 0.0
    worker_started: float = 0.0
    worker_elapsed_s: float = 0.0
    candidate_latency: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    served_latency: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    failure: str | None = None  # a worker bug, reported instead of a verdict

    def observe(
        self,
        generation: int,
        model: LoadedModel,
        feeds: Feeds,
        outputs: Feeds | None,
        error: str | None,
        seconds: float,
    ) -> None:
        if outputs is None or self.stop.is_set():
            return
        self.offered += 1  # a lost increment under a race only blurs a figure
        if random.random() >= self.spec.sample:
            return
        self.sampled += 1
        if self.queue.full():  # the worker is behind (or pacing): not worth a copy
            self.dropped += 1
            return
        # Copies: the feeds may be views into the request's buffer, reused after the reply.
        sample = _Sample(
            {k: np.array(v, copy=True) for k, v in feeds.items()},
            {k: np.array(v, copy=True) for k, v in outputs.items()},
            seconds,
        )
        try:
            self.queue.put_nowait(sample)
        except queue.Full:
            self.dropped += 1

    def agreement(self) -> float:
        return self.agree / self.rows if self.rows else 0.0

    def figures(self) -> dict[str, float]:
        with self.lock:
            out: dict[str, float] = {
                "agreement": round(self.agreement(), 4),
                "compared": float(self.compared),
                "offered": float(self.offered),
                "sampled": float(self.sampled),
                "dropped": float(self.dropped),
                "candidate_errors": float(self.candidate_errors),
                "busy_s": round(self.busy_s, 4),
                "worker_cpu_s": round(self.worker_cpu_s, 4),
                "elapsed_s": round(self.worker_elapsed_s, 3),
                "duty": round(self.busy_s / self.worker_elapsed_s, 4)
                if self.worker_elapsed_s > 0
                else 0.0,
                "sample": self.spec.sample,
                "duty_cycle": self.spec.duty_cycle,
            }
            for side, hist in (
                ("candidate", self.candidate_latency),
                ("served", self.served_latency),
            ):
                for q, name in ((0.5, "p50_ms"), (0.95, "p95_ms")):
                    value = quantile_ms(hist, q)
                    if value is not None:
                        out[f"{side}_{name}"] = round(value, 4)
        return out


class ShadowEvaluator:
    """The `ShadowRunner`: one evaluation at a time, on the host's live traffic."""

    def __init__(
        self,
        host: ModelHost,
        progress_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.progress_s = progress_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._running: _Run | None = None

    def figures(self) -> dict[str, float]:
        """The running evaluation's figures, else the last one's (for telemetry)."""
        run = self._running
        return run.figures() if run is not None else dict(self._last)

    def evaluate(
        self,
        candidate: LoadedModel,
        spec: ShadowSpec,
        cancel: threading.Event,
        progress: Callable[[dict[str, float]], None],
    ) -> Verdict:
        run = _Run(candidate, spec)
        worker = threading.Thread(
            target=self._work, args=(run, cancel), name="shadow-worker", daemon=True
        )
        start = self.clock()
        self._running = run
        self.host.add_observer(run)
        try:
            worker.start()
            next_progress = start + self.progress_s
            while worker.is_alive():
                worker.join(0.1)
                if cancel.is_set():
                    run.stop.set()  # the worker may be pacing: wake it now
                now = self.clock()
                if now >= next_progress and worker.is_alive():
                    next_progress = now + self.progress_s
                    try:
                        progress(run.figures())
                    except Exception:  # a failing event sink must not end the evaluation
                        log.exception("shadow progress callback failed")
        finally:
            self.host.remove_observer(run)
            run.stop.set()
            worker.join()
            self._running = None
        figures = run.figures()
        self._last = figures
        return self._verdict(run, spec, cancel, figures, self.clock() - start)

    @staticmethod
    def _verdict(
        run: _Run,
        spec: ShadowSpec,
        cancel: threading.Event,
        figures: dict[str, float],
        elapsed: float,
    ) -> Verdict:
        n, agreement = run.compared, run.agreement()
        side = ""
        if "candidate_p95_ms" in figures and "served_p95_ms" in figures:
            side = (
                f"; p95 {figures['candidate_p95_ms']:.2f} ms beside the served "
                f"{figures['served_p95_ms']:.2f} ms"
            )
        what = "top-1 agreement" if spec.metric == "top1" else "mean cosine"
        if run.failure is not None:
            return Verdict(False, f"shadow evaluation failed: {run.failure}", figures, "internal")
        if cancel.is_set():
            return Verdict(False, f"cancelled after {n} compared requests", figures, "cancelled")
        if n >= spec.min_requests:
            if agreement >= spec.min_agreement:
                return Verdict(
                    True,
                    f"{what} {agreement:.3f} over {n} live requests "
                    f"(min_agreement {spec.min_agreement:g}){side}",
                    figures,
                )
            return Verdict(
                False,
                f"{what} {agreement:.3f} over {n} live requests is under min_agreement "
                f"{spec.min_agreement:g} ({run.candidate_errors} candidate errors){side}",
                figures,
                "min_agreement",
            )
        return Verdict(
            False,
            f"not enough live traffic: {n} of min_requests {spec.min_requests} requests "
            f"compared in {elapsed:.0f} s (timeout_s {spec.timeout_s:g}, sample "
            f"{spec.sample:g}; {run.offered} answered, {run.dropped} dropped)",
            figures,
            "timeout_s",
        )

    def _work(self, run: _Run, cancel: threading.Event) -> None:
        spec, candidate = run.spec, run.candidate
        threads = runtime_threads(candidate.runtime)
        labelled = classifier_output(candidate)
        names = [o.name for o in candidate.manifest.outputs]
        cpu0 = time.thread_time()
        run.worker_started = start = self.clock()
        deadline = start + spec.timeout_s
        try:
            while not (run.stop.is_set() or cancel.is_set()):
                if run.compared >= spec.min_requests or self.clock() >= deadline:
                    return
                try:
                    sample = run.queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                t0 = time.perf_counter()
                try:
                    answer: Feeds | None = candidate.run(sample.feeds)
                except Exception as exc:  # any failure of the candidate is a disagreement
                    log.debug("shadow candidate failed on a request: %s", exc)
                    answer = None
                took = time.perf_counter() - t0
                self._compare(run, sample, answer, took, labelled, names, spec)
                with run.lock:
                    run.busy_s += took * threads
                    run.worker_elapsed_s = self.clock() - start
                    run.worker_cpu_s = time.thread_time() - cpu0
                # Pace: this run's busy share of one core spread over busy / duty.
                rest = took * threads / spec.duty_cycle - took
                if rest > 0 and (run.stop.wait(rest) or cancel.is_set()):
                    return
        except Exception as exc:  # a bug here must end the evaluation, not hang the job
            log.exception("shadow worker failed")
            run.failure = f"{type(exc).__name__}: {exc}"
        finally:
            with run.lock:
                run.worker_elapsed_s = self.clock() - start
                run.worker_cpu_s = time.thread_time() - cpu0

    @staticmethod
    def _compare(
        run: _Run,
        sample: _Sample,
        answer: Feeds | None,
        took: float,
        labelled: tuple[str, int] | None,
        names: list[str],
        spec: ShadowSpec,
    ) -> None:
        if answer is None:
            agree, rows = 0.0, 1
        elif spec.metric == "top1":
            output = labelled[0] if labelled is not None else names[0]
            agree, rows = top1_agreement(sample.served, answer, output)
        else:
            agree, rows = cosine(sample.served, answer, names), 1
        with run.lock:
            run.compared += 1
            run.agree += agree
            run.rows += rows
            if answer is None:
                run.candidate_errors += 1
            else:
                run.candidate_latency[latency_bucket(took)] += 1
            run.served_latency[latency_bucket(sample.served_s)] += 1


__all__ = ["ShadowEvaluator", "cosine", "runtime_threads", "top1_agreement"]
