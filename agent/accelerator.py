"""Admission's view of an accelerator: what a runtime is told when it opens a model
(`LoadContext`), what the model costs in GPU memory, and what the runtime did on its
own (provider fallbacks, engines built) reported as events.

Kept apart from agent/admission.py so the admission flow (claim, load, measure,
replay) reads the same with or without a GPU: it calls `load_context`, wraps the
load in a `DeviceMeter`, then `judge_device` and `report_notices`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent.config.model import AgentConfig
from agent.device_memory import DeviceMemory, DeviceMeter, DeviceUse, detect
from agent.footprint import Footprint
from agent.memory import MB, MemoryBudget, admit_device
from agent.protocol.events import EventKind
from agent.runtimes.base import LoadContext, Runtime

log = logging.getLogger(__name__)

# A variant's precision -> what TensorRT may compute in beyond FP32. The builder
# validated those numerics (its golden outputs and per-family tolerance): an INT8
# (QDQ) model needs INT8 enabled to run its Q/DQ layers as INT8; FP16 is only
# allowed where the variant says it was built for it.
_PRECISIONS = {
    "fp16": ("fp16",),
    "int8": ("int8",),
    "mixed": ("fp16", "int8"),
}


def precisions_for(precision: str | None, fp16_allowed: bool = True) -> tuple[str, ...]:
    """`fp16_allowed` False (the variant's activations overflow FP16) drops FP16."""
    allowed = _PRECISIONS.get(precision or "", ())
    return allowed if fp16_allowed else tuple(p for p in allowed if p != "fp16")


def device_id(config: AgentConfig, runtime_name: str) -> int:
    section = getattr(config.runtimes, runtime_name, None)
    return int(getattr(section, "device_id", 0) or 0)


def device_cap(config: AgentConfig, budget: MemoryBudget, memory: DeviceMemory | None) -> int:
    """What GPU memory pools may take: on unified memory the host cap itself; on a
    discrete GPU `memory.gpu_max_mb` (0: unbounded here; NVML knows the device's)."""
    if memory is not None and memory.unified:
        return int(budget.cap_bytes)
    return config.memory.gpu_max_mb * MB


def load_context(
    config: AgentConfig,
    budget: MemoryBudget,
    sha256: str,
    precision: str | None,
    memory: DeviceMemory | None,
    fp16_allowed: bool = True,
) -> LoadContext:
    return LoadContext(
        bundle_sha256=sha256,
        cache_dir=config.state_dir / "cache",
        device_memory_cap_bytes=device_cap(config, budget, memory),
        precisions=precisions_for(precision, fp16_allowed),
    )


def device_meter(config: AgentConfig, runtime_name: str) -> DeviceMeter:
    """Read before a load; `detect` finds nothing (None) on a machine without a GPU."""
    return DeviceMeter(detect(device_id(config, runtime_name)))


def judge_device(
    label: str,
    runtime: Runtime,
    meter: DeviceMeter,
    config: AgentConfig,
    footprint: Footprint | None,
) -> tuple[Footprint | None, DeviceUse | None]:
    """What the candidate added to GPU memory, folded into its footprint; refuses
    (AdmissionError) a discrete GPU's cap overrun. A unified-memory cost is judged
    by the caller against the host cap with the rest (Footprint.peak_bytes)."""
    if runtime.family() == "cpu":
        return footprint, None
    use = meter.added()
    if use is None:
        log.info("GPU memory of %s is not measurable here; judged on RSS alone", label)
        return footprint, None
    log.info(
        "%s takes %.1f MB of GPU memory (%s%s)",
        label,
        use.bytes / MB,
        use.source,
        ", unified" if use.unified else "",
    )
    if not use.unified:
        cap = config.memory.gpu_max_mb * MB
        binding = "memory.gpu_max_mb"
        if not cap and use.total_bytes:
            cap, binding = use.total_bytes, "the GPU's memory"
        # What this process holds with the candidate loaded, the served model included
        # (both are resident until the swap); where NVML does not list the process,
        # what the load added.
        held = use.held_bytes if use.held_bytes is not None else use.bytes
        admit_device(label, use.bytes, held, cap, use.source, binding)
    if footprint is not None:
        footprint = dataclasses.replace(
            footprint,
            device_bytes=use.bytes,
            device_source=use.source,
            device_unified=use.unified,
        )
    return footprint, use


_NOTICE_KINDS = {
    "provider_fallback": EventKind.RUNTIME_PROVIDER_FALLBACK,
    "engine_built": EventKind.RUNTIME_ENGINE_BUILT,
}


def report_notices(emit: Callable[..., Any], runtime: Runtime, label: str) -> None:
    """Emit what the runtime did on its own since the last call, as events."""
    for notice in runtime.notices():
        kind = _NOTICE_KINDS.get(notice.kind)
        if kind is None:
            log.info("%s: %s", label, notice.message)
            continue
        emit(kind, f"{label}: {notice.message}", runtime=runtime.name, **notice.fields)


def prune_caches(cache_dir: Path, keep: Iterable[str]) -> list[str]:
    """Remove engine caches (`cache_dir/<runtime cache>/<bundle sha256>/`) of bundles
    the store no longer keeps; returns what was removed. Called after the store's gc."""
    kept = set(keep)
    removed: list[str] = []
    try:
        kinds = [p for p in cache_dir.iterdir() if p.is_dir()]
    except OSError:
        return removed
    for kind in kinds:
        # Called after a swap that already succeeded: a cache folder that cannot be
        # listed is logged, never a failed install.
        try:
            entries = list(kind.iterdir())
        except OSError as exc:
            log.warning("cannot list engine caches in %s: %s", kind, exc)
            continue
        for entry in entries:
            if entry.is_dir() and entry.name not in kept:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(f"{kind.name}/{entry.name}")
    if removed:
        log.info("removed engine caches of bundles no longer kept: %s", ", ".join(removed))
    return removed


__all__ = [
    "device_cap",
    "device_meter",
    "judge_device",
    "load_context",
    "precisions_for",
    "prune_caches",
    "report_notices",
]
