"""Runtime registry: one module per runtime, chosen by name or by what is installed.

A runtime is one module that defines a `Runtime` subclass and decorates it with
`@register`. The registry holds every runtime module of this package (found by
listing the package, so adding one is adding its file) and those that installed
packages declare under the `edgerun.runtimes` entry-point group (a module or a
class). Everything else that names runtimes (the `[runtimes]` config sections,
`model.runtime`/`model.preference`, the probe, tunables, the API's platform) is
derived from it.

A runtime that is not installed is a logged, reported condition, never an import
error at start: runtime modules only import their libraries when asked to load.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from agent.bundle import Manifest
from agent.runtimes.base import (
    InferenceError,
    LoadContext,
    ModelLoadError,
    Runtime,
    RuntimeUnavailableError,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgerun.runtimes"

REGISTRY: dict[str, type[Runtime]] = {}

R = TypeVar("R", bound=type[Runtime])


def register(cls: R) -> R:
    """Class decorator: add a runtime to the registry under its `name`."""
    for attr in ("name", "format", "platform", "config_type"):
        if not hasattr(cls, attr):
            raise TypeError(f"runtime {cls.__qualname__} does not declare {attr}")
    known = REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise TypeError(f"runtime name {cls.name!r} is taken by {known.__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    # This package's modules, in name order (their order is the default preference
    # only through DEFAULT_PREFERENCE below).
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{info.name}")
    # Out-of-tree runtimes. A broken plugin must not stop an agent that does not use
    # it: it is logged and left out (a config naming it gets "unknown runtime").
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if isinstance(loaded, type) and issubclass(loaded, Runtime):
                register(loaded)  # TypeError: a class missing its declarations, a taken name
        except Exception as exc:  # any import-time failure of a third-party module
            log.warning("runtime plugin %s (%s) does not load: %s", ep.name, ep.value, exc)


_discover()

# Built-in runtimes first, fastest/most general first; then the others by name.
_BUILTIN_ORDER = ("onnxruntime", "litert")
DEFAULT_PREFERENCE: tuple[str, ...] = tuple(
    [n for n in _BUILTIN_ORDER if n in REGISTRY]
    + sorted(n for n in REGISTRY if n not in _BUILTIN_ORDER)
)
# The registry lists them in that order too (messages, `choices`, config sections).
for _name in DEFAULT_PREFERENCE:
    REGISTRY[_name] = REGISTRY.pop(_name)

# Re-exported for callers that configure the built-ins directly.
from agent.runtimes.litert import LiteRTConfig  # noqa: E402
from agent.runtimes.ort import OrtConfig  # noqa: E402

__all__ = [
    "DEFAULT_PREFERENCE",
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "InferenceError",
    "LiteRTConfig",
    "LoadContext",
    "ModelLoadError",
    "OrtConfig",
    "Runtime",
    "RuntimeUnavailableError",
    "availability",
    "choose_runtime",
    "load_runtime",
    "register",
    "runtime_for_format",
]


def runtime_for_format(fmt: str) -> str:
    """The preferred registered runtime that runs bundle format `fmt` (KeyError if none):
    what the build pipeline measures a model file with."""
    for name in DEFAULT_PREFERENCE:
        if REGISTRY[name].format == fmt:
            return name
    raise KeyError(f"no registered runtime runs {fmt} models (known: {', '.join(REGISTRY)})")


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
    context: LoadContext | None = None,
) -> Runtime:
    """Open the bundle's model for runtime `name` with that runtime's config section.

    `model_file` (a path inside the bundle) opens a particular variant's file; None
    opens the file the manifest lists for the runtime's format. `context` tells the
    runtime where it may cache and what memory cap bounds its device pools."""
    cls = REGISTRY[name]
    model = directory / (model_file if model_file is not None else manifest.formats[cls.format])
    config = getattr(configs, name, None)
    if config is None:  # a config built before this runtime registered: its defaults
        config = cls.config_type()
    try:
        return cls.open(model, manifest.inputs, manifest.outputs, config, context or LoadContext())
    except ImportError as exc:  # installed, but broken on this machine
        raise RuntimeUnavailableError(f"{name} cannot be imported here: {exc}") from exc
