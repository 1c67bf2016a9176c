"""GPU memory a model costs on this device, read where the platform tells it.

RSS does not see memory a GPU driver allocates: a discrete GPU's own memory (the
CUDA provider's arena, cuDNN workspaces, TensorRT engines), or on a Jetson the
unified DRAM that nvmap hands the GPU, which is the same physical memory the agent's
cap protects. Two sources, chosen once per process:

- **nvmap** (Jetson/Tegra, unified): `/proc/meminfo` `NvMapMemUsed`, which NVIDIA's
  *CUDA for Tegra* application note names as the device-allocated memory (the other
  source it names, `/sys/kernel/debug/nvmap/iovmm/clients`, is debugfs, root only).
  System-wide: the figure is read around a load, so what other processes allocate in
  that window is counted too (errs toward refusing).
- **nvml** (discrete GPUs): nvidia-ml-py (`pip install 'edgerun[gpu]'`): the device's
  used memory around the load gives what it added; what the agent holds in all is this
  process's `usedGpuMemory` (`nvmlDeviceGetComputeRunningProcesses`) where NVML lists
  it (not in another PID namespace).

Neither is read by an agent whose model runs on a CPU: NVML is only initialised when
a GPU provider serves.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")


class DeviceMemory(Protocol):
    """One source of device-memory readings."""

    @property
    def source(self) -> str: ...  # "nvml" | "nvmap"

    @property
    def unified(self) -> bool: ...  # GPU memory is the host's RAM (counts against the cap)

    def used_bytes(self) -> int | None:
        """Device memory in use now (this process where the source can tell)."""

    def total_bytes(self) -> int | None:
        """The device's memory (None: unified, or unknown)."""

    def process_bytes(self) -> int | None:
        """This process's own device memory where the source can tell (else None)."""


def parse_meminfo_kb(text: str, key: str) -> int | None:
    """`key` of /proc/meminfo in bytes (lines are `Key:   123456 kB`)."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == key:
            parts = rest.split()
            try:
                value = int(parts[0])
            except (IndexError, ValueError):
                return None
            unit = parts[1] if len(parts) > 1 else ""
            return value * 1024 if unit == "kB" else value
    return None


@dataclass(frozen=True)
class NvmapMemory:
    """Unified memory on a Jetson: `NvMapMemUsed` in /proc/meminfo."""

    meminfo: Path = MEMINFO

    @property
    def source(self) -> str:
        return "nvmap"

    @property
    def unified(self) -> bool:
        return True

    def used_bytes(self) -> int | None:
        try:
            return parse_meminfo_kb(self.meminfo.read_text(), "NvMapMemUsed")
        except OSError:
            return None

    def total_bytes(self) -> int | None:
        return None

    def process_bytes(self) -> int | None:
        return None  # nvmap's per-process table is in debugfs (root only)

    @classmethod
    def present(cls, meminfo: Path = MEMINFO) -> bool:
        try:
            return parse_meminfo_kb(meminfo.read_text(), "NvMapMemUsed") is not None
        except OSError:
            return False


class NvmlMemory:
    """A discrete GPU through NVML (nvidia-ml-py's `pynvml` module)."""

    def __init__(self, nvml: Any, device_id: int = 0, pid: int | None = None) -> None:
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(device_id)
        self._pid = os.getpid() if pid is None else pid
        self.device_id = device_id

    @property
    def source(self) -> str:
        return "nvml"

    @property
    def unified(self) -> bool:
        return False

    def used_bytes(self) -> int | None:
        # The device's used memory: read around a load it gives what the load added,
        # whether or not NVML lists this process (before its first CUDA context it is
        # not listed; in another PID namespace never), like nvmap's system-wide figure.
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except self._nvml.NVMLError as exc:
            log.debug("NVML reading failed: %s", exc)
            return None

    def process_bytes(self) -> int | None:
        """This process's `usedGpuMemory`, None where NVML does not list it."""
        nvml = self._nvml
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if int(proc.pid) == self._pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        except nvml.NVMLError as exc:
            log.debug("NVML reading failed: %s", exc)
        return None

    def total_bytes(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        except self._nvml.NVMLError:
            return None


_LOCK = threading.Lock()
_DETECTED: dict[int, DeviceMemory | None] = {}


def detect(device_id: int = 0, meminfo: Path = MEMINFO) -> DeviceMemory | None:
    """The device-memory source of this machine, once per process (None: none)."""
    with _LOCK:
        if device_id not in _DETECTED:
            _DETECTED[device_id] = _detect(device_id, meminfo)
        return _DETECTED[device_id]


def _none(device_id: int, why: str) -> None:
    # Said once: detect keeps the answer for the process.
    log.info("no device memory source for GPU %s (%s); its memory is not measured", device_id, why)


def _detect(device_id: int, meminfo: Path) -> DeviceMemory | None:
    if NvmapMemory.present(meminfo):
        return NvmapMemory(meminfo)
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        _none(device_id, "nvidia-ml-py is not installed; pip install 'edgerun[gpu]'")
        return None
    try:
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        _none(device_id, f"NVML does not start: {exc}")
        return None
    if device_id >= count:
        _none(device_id, f"NVML sees {count} GPU(s); no device {device_id}")
        return None
    try:
        return NvmlMemory(nvml, device_id)
    except nvml.NVMLError as exc:  # no permission on that GPU, GPU lost...
        _none(device_id, f"NVML cannot open GPU {device_id}: {exc}")
        return None


@dataclass(frozen=True)
class DeviceUse:
    """What a model added to device memory while it was loaded and validated."""

    source: str
    unified: bool
    bytes: int
    total_bytes: int | None
    held_bytes: int | None = None  # this process's device memory with it loaded, if known


class DeviceMeter:
    """Device memory before a load and after validation (arenas keep their peak)."""

    def __init__(self, memory: DeviceMemory | None) -> None:
        self.memory = memory
        self.base = memory.used_bytes() if memory is not None else None

    def added(self) -> DeviceUse | None:
        if self.memory is None or self.base is None:
            return None
        now = self.memory.used_bytes()
        if now is None:
            return None
        return DeviceUse(
            self.memory.source,
            self.memory.unified,
            max(0, now - self.base),
            self.memory.total_bytes(),
            self.memory.process_bytes(),
        )


def unified_counter(memory: DeviceMemory | None) -> Callable[[], int] | None:
    """What the GPU holds beyond what it held when this was called, for the RSS
    watcher on unified memory (None on a discrete GPU or none): on a Jetson the soft
    limit then sheds requests on RSS + GPU memory, the RAM both take."""
    if memory is None or not memory.unified:
        return None
    start = memory.used_bytes() or 0

    def counted() -> int:
        now = memory.used_bytes()
        return max(0, (now or start) - start)

    return counted


__all__ = [
    "DeviceMemory",
    "DeviceMeter",
    "DeviceUse",
    "NvmapMemory",
    "NvmlMemory",
    "detect",
    "parse_meminfo_kb",
    "unified_counter",
]
