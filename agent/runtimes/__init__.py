"""Runtime registry: one module per runtime, chosen by name or by what is installed.

A runtime that is not installed is a logged, reported condition, never an import
error at start: the registry only imports runtime libraries when asked to load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.bundle import Manifest
from agent.runtimes.base import (
    InferenceError,
    ModelLoadError,
    Runtime,
    RuntimeUnavailableError,
)
from agent.runtimes.litert import LiteRTConfig, LiteRTRuntime
from agent.runtimes.ort import OrtConfig, OrtRuntime

log = logging.getLogger(__name__)

REGISTRY: dict[str, type[Runtime]] = {
    OrtRuntime.name: OrtRuntime,
    LiteRTRuntime.name: LiteRTRuntime,
}

__all__ = [
    "REGISTRY",
    "InferenceError",
    "LiteRTConfig",
    "ModelLoadError",
    "OrtConfig",
    "Runtime",
    "RuntimeUnavailableError",
    "availability",
    "choose_runtime",
    "load_runtime",
]


def availability() -> dict[str, str | None]:
    """Runtime name -> None if usable, else the reason it is not."""
    return {name: cls.unavailable_reason() for name, cls in REGISTRY.items()}


def choose_runtime(manifest: Manifest, requested: str, preference: list[str]) -> str:
    """Pick the runtime for a bundle, or explain every reason none fits."""
    candidates = preference if requested == "auto" else [requested]
    reasons = []
    for name in candidates:
        cls = REGISTRY.get(name)
        if cls is None:
            reasons.append(f"{name}: unknown runtime (known: {', '.join(REGISTRY)})")
            continue
        if cls.format not in manifest.formats:
            reasons.append(
                f"{name}: bundle has no {cls.format} model (it has {', '.join(manifest.formats)})"
            )
            continue
        why = cls.unavailable_reason()
        if why is not None:
            log.warning("runtime %s is not available: %s", name, why)
            reasons.append(f"{name}: {why}")
            continue
        return name
    raise RuntimeUnavailableError("no runtime can serve this bundle: " + "; ".join(reasons))


def load_runtime(
    name: str,
    manifest: Manifest,
    directory: Path,
    configs: Any,
    *,
    model_file: str | None = None,
) -> Runtime:
    """Open the bundle's model for runtime `name` with that runtime's config section.

    `model_file` (a path inside the bundle: a variant's file) opens that file instead
    of the legacy `manifest.formats[cls.format]`."""
    cls = REGISTRY[name]
    model = directory / (model_file if model_file is not None else manifest.formats[cls.format])
    config = getattr(configs, name)
    try:
        if cls is OrtRuntime:
            return OrtRuntime(model, manifest.inputs, manifest.outputs, config)
        if cls is LiteRTRuntime:
            return LiteRTRuntime(model, manifest.inputs, manifest.outputs, config)
    except ImportError as exc:  # installed, but broken on this machine
        raise RuntimeUnavailableError(f"{name} cannot be imported here: {exc}") from exc
    raise RuntimeUnavailableError(f"runtime {name} has no loader")  # pragma: no cover
