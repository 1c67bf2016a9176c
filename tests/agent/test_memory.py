"""Memory cap: effective limit from config/cgroup/RAM, admission, load shedding."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.api.client import ApiClient, ApiError
from agent.config.model import MemoryConfig
from agent.memory import MB, AdmissionError, admit, cgroup_limit_bytes, compute_budget
from tests.helpers import base_config, running_agent, samples, write_config

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


def test_load_pushing_against_the_soft_limit_is_shed_and_the_agent_recovers(tmp: Path) -> None:
    extra = (
        "[memory]\nsoft_limit_mb = {soft}\ncheck_interval_ms = 20\n"
        "[runtimes.onnxruntime]\ncpu_mem_arena = false\n"
    )
    api = "max_batch_size = 100000\nmax_request_mb = 64"
    # First measure the idle RSS of this agent, then set the soft limit 60 MB above it.
    config = base_config(tmp, extra=extra.format(soft=100000), api=api)
    with running_agent(tmp, config) as agent, agent.client() as c:
        idle_mb = c.get_json("/v2/edgerun/status")["memory"]["rss_mb"]
    soft = int(idle_mb + 60)
    with running_agent(tmp, base_config(tmp, extra=extra.format(soft=soft), api=api)) as agent:
        big = np.random.default_rng(0).random((40000, 1, 8, 8), dtype=np.float32)  # ~10 MB
        codes: list[str] = []
        lock = threading.Lock()

        def heavy() -> None:
            with ApiClient(str(agent.socket), timeout=120) as client:
                for _ in range(3):
                    try:
                        client.infer("digits", {"input": big}, binary=True)
                        result = "ok"
                    except ApiError as exc:
                        result = exc.code
                    with lock:
                        codes.append(result)

        threads = [threading.Thread(target=heavy) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with agent.client() as c:
            status = c.get_json("/v2/edgerun/status")
            assert status["memory"]["peak_rss_mb"] > soft, status["memory"]
            assert "overloaded" in codes, codes  # new requests were refused while above
            assert "ok" in codes, codes
            assert status["memory"]["shed_requests"] == codes.count("overloaded")
            # Load is gone: the agent gives memory back and serves again.
            images, labels = samples()
            deadline = time.monotonic() + 30
            while True:
                try:
                    out = c.infer("digits", {"input": images})
                    break
                except ApiError as exc:
                    assert exc.code == "overloaded"
                    assert time.monotonic() < deadline, "agent never recovered"
                    time.sleep(0.2)
            assert (out["logits"].argmax(1) == labels).mean() >= 0.9
            metrics = c.metrics()
            assert 'edgerun_inference_errors_total{code="overloaded"}' in metrics
        assert agent.proc.poll() is None
    assert agent.proc.returncode == 0
    assert "event overloaded" in agent.output()
