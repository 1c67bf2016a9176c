"""Hostile load: requests that would take the agent past its memory cap.

Run against a real agent process (default config but the `memory` limits) serving the
wide model of tests/memory_model.py, whose rows cost ~0.8 MB of activations each:
single batches beyond the headroom or `api.max_batch_size`, and concurrent bursts of 4.9 MB binary batches (issue 7,
section 3). Every refusal must carry its code; the agent's RSS is sampled
throughout (psutil) and reported per case. The `memory.admission` cases install
bundles whose memory claim is a lie into an in-process agent (issue 7, section 2).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

from agent.api.client import ApiClient, ApiError
from agent.footprint import PeakMeter
from agent.memory import MB, AdmissionError
from agent.signing import load_private_key
from tests.helpers import (
    DEMO_KEY,
    SAMPLE_BUNDLE,
    AgentProcess,
    base_config,
    write_config,
)
from tests.hostile import Case, Outcome
from tests.memory_model import make_wide_bundle, rows

CLASS = "memory.load"
CLASSES = (CLASS, "memory.admission")
CAP_MB = 320
# Below the default 90 % of the cap: 256 rows (~180 MB with their input) must never
# fit above the agent's ~100 MB at rest, while 128 rows do.
SOFT_MB = 250
CLIENTS = 8
BURST_ROWS = 128  # 4.9 MB binary body
HANG_GUARD_S = 120


class _Sampler:
    """Peak RSS of a process, sampled every 2 ms while active."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def window(self) -> Iterator[_Sampler]:
        self.peak = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)


def _one(socket: Path, batch: np.ndarray) -> tuple[str | None, str]:
    with ApiClient(str(socket), timeout=HANG_GUARD_S) as client:
        try:
            client.infer("wide", {"input": batch}, binary=True)
        except ApiError as exc:
            return exc.code, str(exc)
    return None, "accepted"


def _burst(socket: Path, batch: np.ndarray, rounds: int) -> list[tuple[str | None, str]]:
    """CLIENTS clients at once, each sending `rounds` batches; (code, message) each."""
    results: list[tuple[str | None, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client() -> None:
        with ApiClient(str(socket), timeout=HANG_GUARD_S) as c:
            start.wait(HANG_GUARD_S)
            for _ in range(rounds):
                try:
                    c.infer("wide", {"input": batch}, binary=True)
                    result: tuple[str | None, str] = (None, "accepted")
                except ApiError as exc:
                    result = (exc.code, str(exc))
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    if any(t.is_alive() for t in threads):
        results.append(("hang", f"a client got no answer within {HANG_GUARD_S} s"))
    return results


def _judge_burst(
    results: list[tuple[str | None, str]], expect: tuple[str, ...]
) -> tuple[str | None, str]:
    """The burst's code: the first refusal outside `expect` if any, else the refusal
    seen (None when every request was accepted: nothing was refused)."""
    refused = [(code, msg) for code, msg in results if code is not None]
    for code, msg in refused:
        if code not in expect:
            return code, msg
    if not refused:
        return None, f"all {len(results)} requests accepted"
    code, msg = refused[0]
    accepted = len(results) - len(refused)
    return code, f"{msg} [{len(refused)} refused, {accepted} accepted]"


def _load_cases(workdir: Path, bundle: Path) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "agent.toml",
        base_config(
            workdir,
            bundle=bundle,
            extra=f"[memory]\nmax_mb = {CAP_MB}\nsoft_limit_mb = {SOFT_MB}\n",
        ),
    )
    agent = AgentProcess(config, workdir / "api.sock")
    outcomes: list[Outcome] = []
    try:
        agent.wait_ready()
        sampler = _Sampler(agent.proc.pid)
        sock = agent.socket

        def run(case: Case, judge: Callable[[], tuple[str | None, str]]) -> None:
            with sampler.window():
                start = time.perf_counter()
                code, message = judge()
                seconds = time.perf_counter() - start
            peak = sampler.peak / MB
            outcomes.append(
                Outcome(case, code, message, seconds, round(peak, 1), {"cap_mb": CAP_MB})
            )

        def case(name: str, expect: tuple[str, ...], note: str) -> Case:
            return Case(CLASS, name, expect, note)

        run(
            case("rows_over_headroom", ("request.too_large",), "256 rows need ~200 MB"),
            lambda: _one(sock, rows(256)),
        )
        run(
            case("rows_over_max_batch_size", ("request.too_large",), "api.max_batch_size"),
            lambda: _one(sock, rows(300)),
        )
        run(
            case(
                "concurrent_too_large",
                ("request.too_large", "overloaded"),
                f"{CLIENTS} clients x 256 rows at once",
            ),
            lambda: _judge_burst(_burst(sock, rows(256), 2), ("request.too_large", "overloaded")),
        )

        def bursts() -> tuple[str | None, str]:
            # Until one request is refused: on a box slow enough that no two ever
            # overlapped, there was nothing to refuse (bounded by the round count).
            code, message = None, ""
            for _ in range(5):
                code, message = _judge_burst(_burst(sock, rows(BURST_ROWS), 3), ("overloaded",))
                if code is not None:
                    break
            return code, message

        run(
            case(
                "concurrent_bursts",
                ("overloaded",),
                f"{CLIENTS} clients x {BURST_ROWS} rows (4.9 MB binary) at once",
            ),
            bursts,
        )
        outcomes.append(_recovers(agent, sampler))
    finally:
        agent.stop()
    return outcomes


def _recovers(agent: AgentProcess, sampler: _Sampler) -> Outcome:
    """Not a refusal: after the bursts a good request succeeds again (hang-guarded).
    Recorded with code "recovered" so the test can assert it beside the refusals."""
    case = Case(CLASS, "good_request_after_bursts", ("recovered",), "8 rows after the load")
    start = time.perf_counter()
    deadline = time.monotonic() + 60
    with sampler.window():
        while True:
            code, message = _one(agent.socket, rows(8))
            if code is None:
                code, message = "recovered", "served again"
                break
            if code != "overloaded" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    return Outcome(case, code, message, time.perf_counter() - start, round(sampler.peak / MB, 1))


def _admission_cases(workdir: Path) -> list[Outcome]:
    from tests.agent.test_admission import make_agent

    key = load_private_key(DEMO_KEY)
    outcomes: list[Outcome] = []
    workdir.mkdir(parents=True, exist_ok=True)
    meter = PeakMeter()
    base = meter.reset()
    agent = make_agent(workdir / "admission", memory={"max_mb": base // MB + 120})
    agent.admission.install(SAMPLE_BUNDLE)

    def install(name: str, note: str, bundle: Path) -> None:
        case = Case("memory.admission", name, ("memory.refused",), note)
        start_rss = meter.reset()
        start = time.perf_counter()
        try:
            agent.admission.install(bundle)
            code, message = None, "installed"
        except AdmissionError as exc:
            code, message = exc.code, str(exc)
        except Exception as exc:  # another refusal: its code is the outcome
            code, message = str(getattr(exc, "code", type(exc).__name__)), str(exc)
        seconds = time.perf_counter() - start
        grew = (meter.peak() - start_rss) / MB
        served = agent.host.model
        extra = {"grew_mb": round(grew, 1)}
        if served is None or served.manifest.version != "1.0.0":
            code, message = "damage", f"no longer serving digits 1.0.0 after {name}"
        outcomes.append(Outcome(case, code, message, seconds, round(meter.peak() / MB, 1), extra))

    # Issue 7's bomb was 65,536 golden cases in a few hundred KB; the bundle rule now
    # caps golden cases at 256 (tests/hostile/bundles.py), so the lie that is left is
    # a model whose 256 cases cost far more than its manifest says.
    bomb = make_wide_bundle(
        workdir / "bomb", key, version="2.0.0", peak_memory_mb=28.2, golden_rows=256, zeros=True
    )
    install("golden_replay_bomb", "256 golden rows of ~0.7 MB each, claims 28 MB", bomb)
    lie = make_wide_bundle(
        workdir / "wide", key, version="3.0.0", peak_memory_mb=1.0, golden_rows=256, zeros=True
    )
    install("tiny_claim_wide_model", "claims 1 MB (the least a manifest may), 256 rows", lie)
    agent.host.close()
    return outcomes


def run_corpus(workdir: Path) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    key = load_private_key(DEMO_KEY)
    bundle = make_wide_bundle(workdir / "wide", key)
    return _load_cases(workdir / "agent", bundle) + _admission_cases(workdir / "install")


__all__ = ["CLASS", "CLASSES", "run_corpus"]
