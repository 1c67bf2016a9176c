"""GPU memory at admission: where it is read (Jetson nvmap, NVML) and how it is judged.

The Jetson readings are parsed from real /proc/meminfo captures of Tegra devices
(tests/agent/fixtures/meminfo/README.md cites them). NVML needs a GPU: tests/gpu/
measures it for real on one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from agent.accelerator import (
    device_cap,
    judge_device,
    load_context,
    precisions_for,
    prune_caches,
)
from agent.bundle import load_unpacked
from agent.config.loader import parse_config
from agent.device_memory import (
    DeviceMeter,
    NvmapMemory,
    _detect,
    parse_meminfo_kb,
)
from agent.footprint import Footprint
from agent.memory import MB, AdmissionError, admit_device, compute_budget, current_rss
from agent.runtimes.ort import OrtRuntime
from agent.service import Agent
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, SampleParts

FIXTURES = Path(__file__).parent / "fixtures" / "meminfo"
TX2 = FIXTURES / "jetson-tx2-l4t32.meminfo"
SHIELD = FIXTURES / "shield-tegra-x1.meminfo"


def test_nvmap_is_read_from_real_tegra_captures() -> None:
    assert parse_meminfo_kb(TX2.read_text(), "NvMapMemUsed") == 805068 * 1024
    assert parse_meminfo_kb(SHIELD.read_text(), "NvMapMemUsed") == 740388 * 1024
    assert parse_meminfo_kb(TX2.read_text(), "MemTotal") == 8038788 * 1024
    assert parse_meminfo_kb(TX2.read_text(), "NoSuchKey") is None
    assert parse_meminfo_kb("NvMapMemUsed: lots kB\n", "NvMapMemUsed") is None


def test_a_tegra_device_is_detected_as_unified_memory() -> None:
    memory = _detect(0, TX2)
    assert isinstance(memory, NvmapMemory) and memory.unified and memory.source == "nvmap"
    assert memory.used_bytes() == 805068 * 1024 and memory.total_bytes() is None


def test_this_machine_has_no_nvmap_and_says_why_it_has_no_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert not NvmapMemory.present(Path("/proc/meminfo"))
    caplog.set_level(logging.INFO, logger="agent.device_memory")
    found = _detect(7, Path("/proc/meminfo"))
    if found is not None:  # a CI machine with a GPU and nvidia-ml-py
        assert found.source == "nvml"
        return
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("no device memory source for GPU 7 (")
    assert any(
        why in said[0]
        for why in ("nvidia-ml-py is not installed", "NVML does not start", "NVML sees")
    )


def test_the_meter_reads_what_a_load_added(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    shutil.copy(TX2, meminfo)
    meter = DeviceMeter(NvmapMemory(meminfo))
    assert meter.base == 805068 * 1024
    # The same capture with 64 MiB more handed to the GPU (what a CUDA context and
    # arena on the candidate would add).
    meminfo.write_text(
        TX2.read_text().replace("NvMapMemUsed:     805068 kB", "NvMapMemUsed:     870604 kB")
    )
    use = meter.added()
    assert use is not None
    assert (use.bytes, use.unified, use.source) == (64 * MB, True, "nvmap")
    assert DeviceMeter(None).added() is None


def test_unified_gpu_memory_counts_in_the_footprint_against_the_host_cap() -> None:
    host = Footprint(10 * MB, 2 * MB, MB, 256, True)
    unified = Footprint(10 * MB, 2 * MB, MB, 256, True, 64 * MB, "nvmap", True)
    discrete = Footprint(10 * MB, 2 * MB, MB, 256, True, 64 * MB, "nvml", False)
    assert unified.peak_bytes(8) == host.peak_bytes(8) + 64 * MB
    assert discrete.peak_bytes(8) == host.peak_bytes(8)
    assert unified.as_dict()["device_mb"] == 64.0
    assert "device_mb" not in host.as_dict()


def test_a_discrete_gpu_cap_refuses_with_the_figures() -> None:
    admit_device("digits 1.0.0", 300 * MB, 900 * MB, 1024 * MB, "nvml", "memory.gpu_max_mb")
    with pytest.raises(AdmissionError) as info:
        admit_device("digits 1.0.0", 300 * MB, 1100 * MB, 1024 * MB, "nvml", "memory.gpu_max_mb")
    assert str(info.value) == (
        "model digits 1.0.0 takes 300.0 MB of GPU memory (measured on this device through "
        "nvml), 1100.0 MB held in all, above the GPU memory cap of 1024.0 MB (set by "
        "memory.gpu_max_mb); keeping the current model"
    )
    assert info.value.code == "memory.refused" and info.value.need_mb == 300.0


def test_the_load_context_bounds_device_pools_by_the_right_cap(tmp_path: Path) -> None:
    config = parse_config(
        {"state_dir": str(tmp_path), "memory": {"max_mb": 2048, "gpu_max_mb": 512}}, environ={}
    )
    budget = compute_budget(config.memory, detect_cgroup=False)
    assert device_cap(config, budget, None) == 512 * MB  # a discrete GPU (or none)
    assert device_cap(config, budget, NvmapMemory(TX2)) == budget.cap_bytes == 2048 * MB
    ctx = load_context(config, budget, "cd" * 32, "mixed", NvmapMemory(TX2))
    assert ctx.cache_dir == tmp_path / "cache" and ctx.bundle_sha256 == "cd" * 32
    assert ctx.precisions == ("fp16", "int8") and ctx.device_memory_cap_bytes == 2048 * MB
    assert precisions_for("fp32") == precisions_for(None) == ()


def test_a_model_served_on_a_cpu_is_not_charged_gpu_memory(
    sample_parts: SampleParts, tmp_path: Path
) -> None:
    manifest = load_unpacked(sample_parts.directory)
    rt = OrtRuntime(sample_parts.directory / "model.onnx", manifest.inputs, manifest.outputs)
    meminfo = tmp_path / "meminfo"
    shutil.copy(TX2, meminfo)
    meter = DeviceMeter(NvmapMemory(meminfo))
    meminfo.write_text(TX2.read_text().replace("805068 kB", "999999 kB"))
    config = parse_config({}, environ={})
    footprint = Footprint(MB, MB, 0, 256, True)
    assert judge_device("digits", rt, meter, config, footprint) == (footprint, None)


def test_engine_caches_of_bundles_no_longer_kept_are_removed_after_an_install(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "trust": {"public_keys": [str(DEMO_PUB)]},
            "api": {"socket": str(tmp_path / "api.sock")},
        },
        {},
    )
    agent = Agent(config)
    stale = tmp_path / "state" / "cache" / "tensorrt" / ("0" * 64)
    stale.mkdir(parents=True)
    (stale / "model_ctx.engine").write_bytes(b"an engine of a bundle long gone")
    model = agent.admission.install(SAMPLE_BUNDLE)
    kept = tmp_path / "state" / "cache" / "tensorrt" / model.sha256
    assert not stale.exists()
    kept.mkdir(parents=True)
    assert prune_caches(tmp_path / "state" / "cache", [model.sha256]) == []
    assert kept.is_dir()


def test_on_unified_memory_the_watcher_sheds_on_rss_plus_gpu_memory(tmp_path: Path) -> None:
    from agent.device_memory import unified_counter
    from agent.memory import MemoryBudget, RssWatcher

    meminfo = tmp_path / "meminfo"
    shutil.copy(TX2, meminfo)
    counter = unified_counter(NvmapMemory(meminfo))
    assert counter is not None and counter() == 0
    assert unified_counter(None) is None
    rss = RssWatcher(MemoryBudget(1 << 40, 1 << 40, None, None, 1 << 40), 1.0).sample()
    # A soft limit 256 MiB above this process's RSS: RSS alone stays under it.
    soft = rss + 256 * MB
    watcher = RssWatcher(MemoryBudget(soft + MB, soft, None, None, 1 << 40), 1.0)
    watcher.device_bytes = counter
    assert not watcher.overloaded and watcher.sample() < soft
    # The GPU takes 512 MiB more of the same RAM (the capture with NvMapMemUsed raised).
    meminfo.write_text(TX2.read_text().replace("805068 kB", f"{805068 + 512 * 1024} kB"))
    counted = watcher.sample()
    # (RSS itself may fall a little: above the soft limit the watcher trims the heap.)
    assert counted - current_rss() >= 500 * MB
    assert watcher.overloaded
