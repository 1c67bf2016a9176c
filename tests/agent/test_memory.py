"""Memory cap: effective limit from config/cgroup/RAM, admission, load shedding."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.api.client import ApiClient, ApiError
from agent.bundle import TensorSpec
from agent.config.model import MemoryConfig, RuntimesConfig
from agent.errors import OverloadedError, TooLargeError
from agent.footprint import PeakMeter
from agent.link.tunables import Tunables
from agent.memory import (
    MB,
    AdmissionError,
    admit,
    cgroup_limit_bytes,
    compute_budget,
    current_rss,
    release_free_memory,
    tune_allocator,
)
from agent.runtimes.ort import OrtRuntime
from tests.agent.test_admission import make_agent
from tests.helpers import (
    SAMPLE_BUNDLE,
    base_config,
    running_agent,
    samples,
    write_config,
)
from tests.memory_model import ROW_SHAPE, build_model, expected, make_wide_bundle, rows

# /proc/self/cgroup as captured on a cgroup v2 host (systemd service) and a v1 host.
V2_PROC = "0::/system.slice/edgerun.service\n"
V1_PROC = (
    "12:pids:/system.slice/edgerun.service\n"
    "4:memory:/system.slice/edgerun.service\n"
    "1:name=systemd:/system.slice/edgerun.service\n"
)


def test_cgroup_v2_limit_is_the_tightest_up_the_tree(tmp: Path) -> None:
    root = tmp / "cg"
    svc = root / "system.slice" / "edgerun.service"
    svc.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (svc / "memory.max").write_text("max\n")
    (root / "system.slice" / "memory.max").write_text(f"{300 * MB}\n")
    proc = tmp / "cgroup"
    proc.write_text(V2_PROC)
    assert cgroup_limit_bytes(proc, root) == 300 * MB
    (svc / "memory.max").write_text(f"{200 * MB}\n")
    assert cgroup_limit_bytes(proc, root) == 200 * MB


def test_cgroup_v2_unlimited_and_hybrid_layout(tmp: Path) -> None:
    root = tmp / "cg"
    (root / "unified" / "a").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("memory\n")
    (root / "unified" / "a" / "memory.max").write_text("max\n")
    proc = tmp / "cgroup"
    proc.write_text("0::/a\n")
    assert cgroup_limit_bytes(proc, root) is None
    (root / "unified" / "a" / "memory.max").write_text(f"{64 * MB}\n")
    assert cgroup_limit_bytes(proc, root) == 64 * MB


def test_cgroup_v1_limit_and_its_unlimited_value(tmp: Path) -> None:
    root = tmp / "cg"
    svc = root / "memory" / "system.slice" / "edgerun.service"
    svc.mkdir(parents=True)
    (svc / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    proc = tmp / "cgroup"
    proc.write_text(V1_PROC)
    assert cgroup_limit_bytes(proc, root) is None
    (svc / "memory.limit_in_bytes").write_text(f"{128 * MB}\n")
    assert cgroup_limit_bytes(proc, root) == 128 * MB
    assert cgroup_limit_bytes(tmp / "no-such-file", root) is None


def test_budget_takes_the_smallest_limit() -> None:
    b = compute_budget(MemoryConfig(max_mb=512), cgroup_bytes=300 * MB, physical_bytes=4096 * MB)
    assert b.cap_bytes == 300 * MB and b.source == "cgroup"
    assert b.soft_limit_bytes == int(300 * MB * 0.9)
    b = compute_budget(
        MemoryConfig(max_mb=256), cgroup_bytes=None, physical_bytes=4096 * MB, detect_cgroup=False
    )
    assert b.cap_bytes == 256 * MB and b.source == "memory.max_mb"
    b = compute_budget(MemoryConfig(), physical_bytes=1024 * MB, detect_cgroup=False)
    assert b.cap_bytes == 1024 * MB and b.source == "physical memory"
    b = compute_budget(MemoryConfig(max_mb=256, soft_limit_mb=200), detect_cgroup=False)
    assert b.soft_limit_bytes == 200 * MB


def test_admission_refuses_with_the_numbers() -> None:
    budget = compute_budget(MemoryConfig(max_mb=100), detect_cgroup=False)
    admit("digits 1.0.0", 20.0, budget, 70 * MB)  # 90 MB fits under 100
    with pytest.raises(AdmissionError) as info:
        admit("digits 1.0.0", 40.0, budget, 70 * MB)
    msg = str(info.value)
    assert "needs 40.0 MB" in msg and "70.0 MB" in msg and "110.0 MB" in msg
    assert "memory cap of 100.0 MB (set by memory.max_mb)" in msg


def test_admission_judges_on_the_larger_of_claim_and_measurement() -> None:
    budget = compute_budget(MemoryConfig(max_mb=100), detect_cgroup=False)
    admit("m 1", 5.0, budget, 70 * MB, measured_mb=20.0)  # 90 MB fits
    with pytest.raises(AdmissionError) as info:
        admit("m 1", 5.0, budget, 70 * MB, measured_mb=40.0)
    assert "needs 40.0 MB (measured on this device; its manifest claims 5.0 MB)" in str(info.value)
    with pytest.raises(AdmissionError, match=r"needs 40.0 MB \(measured peak\)"):
        admit("m 1", 40.0, budget, 70 * MB, measured_mb=1.0)
    # A claim that is no figure at all does not lower the measured need.
    # (The manifest schema refuses such figures; admission never trusts them either.)
    for claim in (float("nan"), -100000.0, 0.0, float("-inf"), float("inf")):
        with pytest.raises(AdmissionError, match="needs 40.0 MB .measured on this device"):
            admit("m 1", claim, budget, 70 * MB, measured_mb=40.0)
        admit("m 1", claim, budget, 70 * MB, measured_mb=1.0)


def _cgroup_v1_dir() -> Path | None:
    """A fresh memory cgroup under ours, when this machine lets us make one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            base = Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/")
            target = base / f"edgerun-test-{os.getpid()}"
            try:
                target.mkdir()
            except OSError:
                return None
            return target
    return None


def test_real_cgroup_limit_is_read_by_a_process_inside_it() -> None:
    cg = _cgroup_v1_dir()
    if cg is None:
        pytest.skip("this machine does not let tests create a memory cgroup (v1)")
    try:
        (cg / "memory.limit_in_bytes").write_text(str(700 * MB))
        code = (
            "import os,sys; open(sys.argv[1]+'/cgroup.procs','w').write(str(os.getpid()));"
            "from agent.memory import compute_budget; from agent.config.model import MemoryConfig;"
            "b = compute_budget(MemoryConfig(max_mb=900)); print(b.cap_bytes, b.source)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(cg)], capture_output=True, text=True, check=True
        )
        cap, source = out.stdout.split()
        assert int(cap) == 700 * MB and source == "cgroup"
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_agent_refuses_a_model_that_does_not_fit_and_says_why(tmp: Path) -> None:
    # The sample's measured onnxruntime peak is ~28 MB; a 40 MB cap leaves no room
    # next to the agent's own ~40 MB.
    config = write_config(tmp / "agent.toml", base_config(tmp, extra="[memory]\nmax_mb = 40\n"))
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "cannot start" in proc.stderr
    assert (
        "measured peak" in proc.stderr
        and "above the memory cap of 40.0 MB (set by memory.max_mb)" in proc.stderr
    )


def test_a_bundle_whose_claim_is_a_lie_is_refused_on_what_it_measures(
    demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    # Issue 7: 65,536 golden cases in a few hundred KB, claiming 28 MB, took the
    # install to 900 MB. Golden cases are now capped at 256 by the bundle rule; what
    # is left is a model whose cases cost far more than its manifest claims. The agent
    # measures the model on this device and judges the replay before running it.
    rss = current_rss()
    agent = make_agent(tmp, memory={"max_mb": rss // MB + 120})
    agent.admission.install(SAMPLE_BUNDLE)
    lie = make_wide_bundle(
        tmp / "wide", demo_key, version="2.0.0", peak_memory_mb=1.0, golden_rows=256, zeros=True
    )
    assert lie.stat().st_size < 1 * MB
    with pytest.raises(AdmissionError) as info:
        agent.admission.install(lie)
    message = str(info.value)
    assert "needs" in message and "2.0.0" in message
    assert "(measured on this device; its manifest claims 1.0 MB)" in message
    assert "above the memory cap" in message and "keeping the current model" in message
    assert agent.events.recent[-1].data["code"] == "memory.refused"
    model, out = agent.host.infer("digits", {"input": samples()[0]})
    assert model.manifest.version == "1.0.0" and out["logits"].shape == (10, 10)


def test_the_measured_cost_is_recorded_and_scales_with_rows(
    demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp)
    model = agent.admission.install(make_wide_bundle(tmp / "wide", demo_key))
    fp = model.footprint
    assert fp is not None and fp.batched
    # 96 x 100 inputs expanded 8 times, twice: at least 0.5 MB a row on any allocator.
    assert fp.per_row_bytes > 0.5 * MB, fp
    assert fp.request_bytes(2 * fp.input_bytes_per_row) < fp.request_bytes(
        100 * fp.input_bytes_per_row
    )
    assert model.summary()["memory"]["per_row_mb"] == round(fp.per_row_bytes / MB, 4)


def test_the_cost_is_measured_where_the_peak_rss_cannot_be_reset(
    demo_key: Ed25519PrivateKey, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some kernels or sandboxes refuse writes to /proc/self/clear_refs: the meter
    # then reads RSS after each probe, which the runtime's pools still hold.
    monkeypatch.setattr(PeakMeter, "_try_reset", staticmethod(lambda: False))
    assert not PeakMeter().resettable
    agent = make_agent(tmp)
    model = agent.admission.install(make_wide_bundle(tmp / "wide", demo_key))
    assert model.footprint is not None and model.footprint.per_row_bytes > 0.5 * MB


def test_a_request_that_can_never_fit_is_refused_with_the_figures(
    demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    tune_allocator()  # as the agent does at start: freed tensors go back to the kernel
    agent = make_agent(tmp)
    agent.admission.install(make_wide_bundle(tmp / "wide", demo_key))
    soft = agent.host.rest_rss() // MB + 100
    Tunables(agent).set({"memory.soft_limit_mb": soft})  # config.set, as over MQTT
    with pytest.raises(TooLargeError) as info:
        agent.host.infer("wide", {"input": rows(256)})
    message = info.value.message
    del info  # its traceback holds the refused request's 10 MB of input
    assert message.startswith("256 rows need about "), message
    assert "measured at validation" in message and f"soft limit of {soft:.1f} MB" in message
    most = int(message.split("send at most ")[1].split()[0])
    assert 0 < most < 256
    assert "memory.max_mb / memory.soft_limit_mb" in message
    # What the message says is no longer refused for good (it may have to wait for
    # room: this test process's own RSS moves), and half of it runs.
    try:
        agent.host.infer("wide", {"input": rows(most)})
    except OverloadedError as exc:
        assert "retry later" in exc.message
    _, out = agent.host.infer("wide", {"input": rows(most // 2)})
    assert out["score"].shape == (most // 2, 96)
    assert agent.host.inflight == 0 and agent.host._reserved == 0


def test_an_idle_agent_rebuilds_a_runtime_whose_pools_keep_memory(
    demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    tune_allocator()
    agent = make_agent(tmp, memory={"max_mb": current_rss() // MB + 600, "recover_after_s": 0.1})
    old = agent.admission.install(make_wide_bundle(tmp / "wide", demo_key))
    rest = agent.host.rest_rss()
    # Straight into the runtime, without the shrink the host asks for after big
    # requests: the arena keeps ~170 MB, as an agent with a leaky runtime would.
    old.runtime.run({"input": rows(256)})
    release_free_memory()
    grown = current_rss()
    assert grown > rest + 100 * MB, (grown, rest)
    generation = agent.host.generation
    deadline = time.monotonic() + 60
    while agent.watcher.reclaims == 0:
        assert time.monotonic() < deadline, "the watcher never rebuilt the runtime"
        agent.watcher.sample()
        time.sleep(0.05)
    assert agent.host.generation == generation + 1
    assert old.closed.is_set()
    assert agent.watcher.rss < grown - 100 * MB, (agent.watcher.rss, grown)
    _, out = agent.host.infer("wide", {"input": rows(4)})
    assert out["score"].shape == (4, 96)
    # Once per idle period: sampling on does not rebuild again.
    for _ in range(5):
        agent.watcher.sample()
    assert agent.watcher.reclaims == 1


def test_concurrent_big_batches_stay_under_the_cap_and_the_agent_recovers(
    demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    """Issue 7: 8 clients sending 4.9 MB binary batches took RSS to 0.7-2.3 GB and
    the agent never came back. Default config but the cap."""
    cap_mb = 320
    bundle = make_wide_bundle(tmp / "wide", demo_key)
    config = base_config(tmp, bundle=bundle, extra=f"[memory]\nmax_mb = {cap_mb}\n")
    with running_agent(tmp, config) as agent:
        sampler = RssSampler(agent.proc.pid)
        batch = rows(128)
        assert 4.8e6 < batch.nbytes < 5e6
        codes: list[str] = []
        messages: dict[str, str] = {}
        lock = threading.Lock()
        start = threading.Barrier(8)

        def client() -> None:
            with ApiClient(str(agent.socket), timeout=120) as c:
                start.wait(60)
                for _ in range(4):
                    try:
                        out = c.infer("wide", {"input": batch}, binary=True)
                        assert out["score"].shape == (128, 96)
                        code = "ok"
                    except ApiError as exc:
                        code = exc.code
                        messages[code] = str(exc)
                    with lock:
                        codes.append(code)

        threads = [threading.Thread(target=client) for _ in range(8)]
        with sampler:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
            # Load is gone: a good request succeeds again (hang guard only).
            small = rows(8)
            deadline = time.monotonic() + 60
            with agent.client() as c:
                while True:
                    try:
                        out = c.infer("wide", {"input": small}, binary=True)
                        break
                    except ApiError as exc:
                        assert exc.code == "overloaded", exc
                        assert time.monotonic() < deadline, "the agent never recovered"
                        time.sleep(0.1)
                status = c.get_json("/v2/edgerun/status")
                metrics = c.metrics()
        assert np.allclose(out["score"], expected(small), atol=1e-3)
        assert sampler.peak < cap_mb * MB, f"peak RSS {sampler.peak / MB:.1f} MB"
        assert set(codes) <= {"ok", "overloaded"}, (codes, messages)
        assert "ok" in codes, messages
        if "overloaded" in messages:
            assert "retry later" in messages["overloaded"]
            assert 'edgerun_inference_errors_total{code="overloaded"}' in metrics
        # Every memory refusal is counted as shed (the recovery poll's too).
        assert status["memory"]["shed_requests"] >= codes.count("overloaded")
        assert status["memory"]["overloaded"] is False
        assert status["memory"]["rss_mb"] < status["memory"]["soft_limit_mb"]
    assert agent.proc.returncode == 0
    log = agent.output()
    if "event overloaded" in log:
        assert "event overload.cleared" in log
    assert "Traceback" not in log


class RssSampler:
    """Peak RSS of another process, sampled every 2 ms in a thread (psutil)."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_run_that_releases_leaves_the_arena_shrunk(tmp: Path) -> None:
    tune_allocator()
    model = build_model(tmp / "wide.onnx")
    inputs = (TensorSpec("input", "float32", (-1, *ROW_SHAPE)),)
    outputs = (TensorSpec("score", "float32", (-1, ROW_SHAPE[0])),)
    batch = {"input": rows(192)}  # ~130 MB of activations
    kept: dict[str, int] = {}
    for how in ("run", "run_and_release"):
        runtime = OrtRuntime(model, inputs, outputs, RuntimesConfig().onnxruntime)
        release_free_memory()
        before = current_rss()
        out = getattr(runtime, how)(batch)
        assert out["score"].shape == (192, 96)
        del out
        release_free_memory()
        kept[how] = current_rss() - before
        runtime.close()
        release_free_memory()
    assert kept["run"] > 60 * MB, kept  # the arena keeps the burst: what this fixes
    # Part of it can stay in the arena (measured here: up to half).
    assert kept["run_and_release"] < kept["run"] * 0.75, kept
