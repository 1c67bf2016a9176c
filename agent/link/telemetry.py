"""One telemetry snapshot: inference figures, system health, model and outbox."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import psutil

from agent.hardware import sysfs
from agent.memory import MB
from agent.protocol.accelerator import AcceleratorReport

log = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")


def thermal_zones(root: Path = THERMAL_ROOT) -> dict[str, float]:
    """°C per zone from /sys/class/thermal/thermal_zone*/ (type and millidegree temp)."""
    return {name: round(c, 1) for name, c in sysfs.thermal_zones(root).items()}


def sensor_temperatures() -> dict[str, float]:
    """What psutil's sensors report (hwmon: CPU packages, NVMe, boards...)."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return {}
    temps: dict[str, float] = {}
    for chip, entries in sensors.items():
        for i, entry in enumerate(entries):
            label = entry.label or str(i)
            temps[f"{chip}.{label}"] = round(float(entry.current), 1)
    return temps


class SystemProbe:
    """psutil and /sys readings; cpu_percent is measured between two calls."""

    def __init__(self, state_dir: Path, thermal_root: Path = THERMAL_ROOT) -> None:
        self.state_dir = state_dir
        self.thermal_root = thermal_root
        self._process = psutil.Process()
        # Prime the counters: the first real reading covers the first interval.
        psutil.cpu_percent(interval=None)
        self._process.cpu_percent(interval=None)

    def read(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        try:
            load = [round(x, 3) for x in os.getloadavg()]
        except OSError:
            load = []
        try:
            disk_free = shutil.disk_usage(self.state_dir).free
        except OSError:
            disk_free = None
        temps = thermal_zones(self.thermal_root)
        temps.update(sensor_temperatures())
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "process_cpu_percent": self._process.cpu_percent(interval=None),
            "rss_mb": round(self._process.memory_info().rss / MB, 1),
            "available_mb": round(mem.available / MB, 1),
            "load": load,
            "temperatures_c": temps,
            "disk_free_mb": None if disk_free is None else round(disk_free / MB, 1),
            "uptime_s": round(time.time() - psutil.boot_time(), 1),
        }


def accelerator_figures(agent: Any) -> AcceleratorReport | None:
    """The `accelerator` block (agent/hardware/jetson.py); None off a Jetson."""
    sampler = getattr(agent, "accelerator", None)
    if sampler is None:
        return None
    # JetsonTelemetry.read() never raises: a failed read is logged there, for /metrics too.
    report: AcceleratorReport | None = sampler.read()
    return report


def inference_figures(window: dict[str, Any]) -> dict[str, Any]:
    """Metrics.window() reshaped: `interval` since the last report, `total` since start."""
    return {"interval": window["window"], "total": window["total"]}


def model_figures(agent: Any, live: bool = False) -> dict[str, Any] | None:
    model = agent.host.model
    if model is None:
        return None
    figures: dict[str, Any] = {
        "name": model.manifest.name,
        "version": model.manifest.version,
        "sha256": model.sha256,
        "runtime": model.runtime_name,
        # What really computes (a provider onnxruntime fell back from is not listed).
        "providers": model.runtime.providers(),
    }
    selection = getattr(model, "selection", None)
    if selection is not None:  # which variant of the bundle serves, and why (agent/variants/)
        figures["variant"] = selection.chosen
        figures["variant_reason"] = selection.reason
    if live:  # telemetry only: these change with every request, the retained state must not
        figures.update(watch_figures(agent))
    return figures


def watch_figures(agent: Any) -> dict[str, Any]:
    """`live`: the served model's live-traffic figures (agent/update/trial.py) and
    `shadow`: the running or last shadow evaluation's (agent/update/shadow.py)."""
    out: dict[str, Any] = {}
    updates = getattr(agent, "updates", None)
    for key, part in (("live", "trial"), ("shadow", "shadow")):
        reader = getattr(getattr(updates, part, None), "figures", None)
        if callable(reader):
            try:
                figures = reader()
            except Exception:  # telemetry must go out even if a figure cannot be read
                log.exception("reading %s figures failed", key)
                continue
            if figures:
                out[key] = figures
    return out
