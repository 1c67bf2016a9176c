"""The `accelerator` block of a telemetry report: what a Jetson's GPU, memory and rails do.

Read on the device by agent/hardware/ (tegrastats, or /sys when tegrastats is absent)
and read back by consoles. Every figure carries its unit in its name; a figure the
device could not read is absent (None), never a made-up zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class AcceleratorFormatError(ValueError):
    """An `accelerator` block a console cannot read (the message names the field)."""


@dataclass(frozen=True)
class CpuCore:
    # None while the core is powered down ("off" in tegrastats).
    load_ratio: float | None
    frequency_hz: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"load_ratio": self.load_ratio, "frequency_hz": self.frequency_hz}


@dataclass(frozen=True)
class AcceleratorReport:
    source: str  # "tegrastats" or "sysfs"
    kind: str = "jetson"
    gpu_load_ratio: float | None = None
    gpu_frequency_hz: float | None = None
    emc_load_ratio: float | None = None  # external memory controller: the DRAM's bandwidth
    emc_frequency_hz: float | None = None
    cpu: tuple[CpuCore, ...] = ()
    # Jetson memory is unified: what the GPU allocates is counted in RAM.
    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    swap_used_mb: float | None = None
    swap_total_mb: float | None = None
    iram_used_kb: float | None = None
    iram_total_kb: float | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    # Current draw per rail, and tegrastats' own running average where it prints one.
    power_mw: dict[str, float] = field(default_factory=dict)
    power_average_mw: dict[str, float] = field(default_factory=dict)
    # Seconds between the reading and the report that carries it.
    age_s: float | None = None

    def has_figures(self) -> bool:
        return any(
            value is not None and value not in ([], {})
            for key, value in self.to_json().items()
            if key not in ("source", "kind", "age_s")
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "gpu_load_ratio": self.gpu_load_ratio,
            "gpu_frequency_hz": self.gpu_frequency_hz,
            "emc_load_ratio": self.emc_load_ratio,
            "emc_frequency_hz": self.emc_frequency_hz,
            "cpu": [core.to_json() for core in self.cpu],
            "ram_used_mb": self.ram_used_mb,
            "ram_total_mb": self.ram_total_mb,
            "swap_used_mb": self.swap_used_mb,
            "swap_total_mb": self.swap_total_mb,
            "iram_used_kb": self.iram_used_kb,
            "iram_total_kb": self.iram_total_kb,
            "temperatures_c": dict(self.temperatures_c),
            "power_mw": dict(self.power_mw),
            "power_average_mw": dict(self.power_average_mw),
            "age_s": self.age_s,
        }

    @classmethod
    def from_json(cls, obj: Any) -> AcceleratorReport:
        if not isinstance(obj, dict):
            raise AcceleratorFormatError('"accelerator" must be an object')
        source = obj.get("source")
        if not isinstance(source, str) or not source:
            raise AcceleratorFormatError('"accelerator.source" must be a non-empty string')
        kind = obj.get("kind", "jetson")
        if not isinstance(kind, str):
            raise AcceleratorFormatError('"accelerator.kind" must be a string')
        cores = obj.get("cpu", [])
        if not isinstance(cores, list):
            raise AcceleratorFormatError('"accelerator.cpu" must be a list')
        cpu = tuple(
            CpuCore(
                _figure(_member(core, f"cpu[{i}]"), "load_ratio", f"cpu[{i}]"),
                _figure(_member(core, f"cpu[{i}]"), "frequency_hz", f"cpu[{i}]"),
            )
            for i, core in enumerate(cores)
        )
        return cls(
            source=source,
            kind=kind,
            gpu_load_ratio=_figure(obj, "gpu_load_ratio"),
            gpu_frequency_hz=_figure(obj, "gpu_frequency_hz"),
            emc_load_ratio=_figure(obj, "emc_load_ratio"),
            emc_frequency_hz=_figure(obj, "emc_frequency_hz"),
            cpu=cpu,
            ram_used_mb=_figure(obj, "ram_used_mb"),
            ram_total_mb=_figure(obj, "ram_total_mb"),
            swap_used_mb=_figure(obj, "swap_used_mb"),
            swap_total_mb=_figure(obj, "swap_total_mb"),
            iram_used_kb=_figure(obj, "iram_used_kb"),
            iram_total_kb=_figure(obj, "iram_total_kb"),
            temperatures_c=_figures(obj, "temperatures_c"),
            power_mw=_figures(obj, "power_mw"),
            power_average_mw=_figures(obj, "power_average_mw"),
            age_s=_figure(obj, "age_s"),
        )


def _member(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AcceleratorFormatError(f'"accelerator.{where}" must be an object')
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AcceleratorFormatError(f'"accelerator.{where}" must be a finite number')
    return float(value)


def _figure(obj: dict[str, Any], key: str, where: str = "") -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    return _number(value, f"{where}.{key}" if where else key)


def _figures(obj: dict[str, Any], key: str) -> dict[str, float]:
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise AcceleratorFormatError(f'"accelerator.{key}" must be an object')
    return {str(name): _number(v, f"{key}.{name}") for name, v in value.items()}
