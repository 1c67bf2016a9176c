"""On a machine with a real NVIDIA GPU that is not a Jetson (the GPU machine's H200), the
Jetson telemetry must stay silent: no tegrastats child, no /sys figures taken for a
Jetson's, nothing in /metrics. Skipped where onnxruntime has no CUDA provider; the GPU
tier is run as tests/gpu/README.md says (h/rt)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.hardware.gauges import accelerator_gauges
from agent.hardware.jetson import JetsonTelemetry, find_tegrastats
from agent.hardware.sysfs import JetsonSysfs


def _cuda_missing() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return f"no CUDAExecutionProvider in this onnxruntime build ({', '.join(providers)})"
    return None


pytestmark = pytest.mark.skipif(_cuda_missing() is not None, reason=str(_cuda_missing()))


def test_a_discrete_gpu_host_is_not_taken_for_a_jetson() -> None:
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("this is a Jetson: the silence checked here does not apply")
    assert os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")
    sysfs = JetsonSysfs(Path("/"))
    assert not sysfs.present() and sysfs.read() is None
    sampler = JetsonTelemetry(find_tegrastats("auto"), sysfs=sysfs)
    sampler.start_sync()
    try:
        assert sampler.child_pid is None and sampler.read() is None
        assert accelerator_gauges(sampler.read()) == []
    finally:
        sampler.stop_sync()
