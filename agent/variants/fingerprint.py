"""What a cached variant choice depends on besides the bundle: this machine and its runtimes.

The choice is a measurement, so it is only as good as the hardware and the library
it was measured with: the CPU model and its instruction-set flags (INT8 is fast with
VNNI or dot-product, slow or saturating without), the GPU, and each runtime's
version, config section and (ONNX Runtime) the execution providers of its build.
Read from /proc without running anything: cheap enough for every start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

from agent.hardware.cpuinfo import DT_MODEL, cpu_fields, flag_set, read_cpuinfo, read_proc_text
from agent.runtimes import REGISTRY

log = logging.getLogger(__name__)

_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
# The first of these names the CPU: x86 (and 32-bit ARM) "model name", else a board's
# "Hardware" or arm64's "CPU implementer"/"CPU part", whichever cpuinfo lists first.
_MODEL_KEYS = ("model name", "hardware", "cpu part", "cpu implementer")


def cpu_identity(cpuinfo: str) -> dict[str, str]:
    """CPU model and a digest of its feature flags from /proc/cpuinfo text."""
    fields = cpu_fields(cpuinfo)
    model = next((v for k, v in fields.items() if k in _MODEL_KEYS), "")
    flags = flag_set(fields)
    return {
        "cpu": model,
        "cpu_flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
    }


def gpu_names() -> list[str]:
    names = []
    try:
        entries = sorted(_NVIDIA_GPUS.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        for line in read_proc_text(entry / "information").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    board = read_proc_text(DT_MODEL).strip("\x00 \n")
    if board:
        names.append(board)
    return names


def hardware() -> dict[str, Any]:
    """The machine's fingerprint: architecture, CPU model and flags, core count, GPUs."""
    return {
        "machine": platform.machine(),
        **cpu_identity(read_cpuinfo()),
        "cpus": os.cpu_count() or 0,
        "gpus": gpu_names(),
    }


def runtime_identity(name: str, configs: Any) -> dict[str, Any]:
    """A runtime's library version, its config section and what its build offers."""
    cls = REGISTRY[name]
    out: dict[str, Any] = {"name": name}
    try:
        out["version"] = cls.library_version()
    except Exception as exc:  # a broken install: no version, the choice is not cached
        log.warning("cannot read the %s version: %s", name, exc)
        out["version"] = None
    section = getattr(configs, name, None)
    if section is not None and dataclasses.is_dataclass(section):
        out["config"] = dataclasses.asdict(section)  # type: ignore[arg-type]
    if name == "onnxruntime" and out["version"] is not None:
        import onnxruntime

        out["providers"] = list(onnxruntime.get_available_providers())
    return out


__all__ = ["cpu_identity", "gpu_names", "hardware", "runtime_identity"]
