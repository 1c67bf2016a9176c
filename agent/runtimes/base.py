"""The interface every runtime implements, and the errors it raises."""

from __future__ import annotations

import abc
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.bundle import TensorSpec

Feeds = dict[str, np.ndarray]


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class RuntimeUnavailableError(Exception):
    """The runtime's Python package is not installed or cannot load here."""


class ModelLoadError(Exception):
    """The runtime is there but refused the model file."""


class InferenceError(Exception):
    """The runtime failed while running a request that had passed input checks."""


@dataclass(frozen=True)
class LoadContext:
    """What the agent knows about where a model is opened, beyond the runtime's own
    config section: runtimes that build caches (TensorRT engines) or size device
    memory pools read it. Every field is optional: a probe or a test opens a model
    with the empty context."""

    # The bundle's sha256: caches built from the model are keyed by it, so a new
    # bundle rebuilds them and a restart of the same one reuses them.
    bundle_sha256: str = ""
    # Where a runtime may keep such caches (under the agent's state directory).
    cache_dir: Path | None = None
    # What device (GPU) memory pools may take, in bytes (0: no bound known): the
    # agent's memory.gpu_max_mb on a discrete GPU; on unified memory (a Jetson) the
    # memory cap itself, as GPU memory there is the RAM the cap protects.
    device_memory_cap_bytes: int = 0
    # Numeric precisions the bundle allows the runtime to compute in beyond its
    # own ("fp16", "int8"), from the manifest/variant; empty: exactly as shipped.
    precisions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Notice:
    """Something a runtime did on its own while opening or first running a model that
    the agent reports as an event (`runtime.<kind>`): a provider fallback, an engine
    built. Runtimes have no event bus; the agent collects these (`Runtime.notices`)."""

    kind: str  # "provider_fallback", "engine_built"
    message: str
    fields: dict[str, Any]


class Runtime(abc.ABC):
    """One loaded model in one runtime. `run` must be safe to call from several threads.

    A runtime is one module (DESIGN.md "Runtimes"): the class declares its name, the
    bundle format it runs, its KServe platform string, its config section type and
    which of its fields are tunable or readable over the link; the registry
    (agent.runtimes), the `[runtimes]` config, the probe, `config.get/set` and the
    API metadata are all derived from these declarations.
    """

    name: ClassVar[str]
    format: ClassVar[str]  # the bundle format it runs: "onnx" or "tflite"
    platform: ClassVar[str]  # KServe v2 model metadata `platform` ("onnxruntime_onnx")
    # The frozen dataclass of its `[runtimes.<name>]` section (every field defaulted).
    config_type: ClassVar[type[Any]]
    # Fields of that section `config.set` may change at run time (the model reopens).
    tunable: ClassVar[tuple[str, ...]] = ()
    # Further fields `config.get` may read (never paths or secrets).
    readable: ClassVar[tuple[str, ...]] = ()
    # The config field the probe sets to measure with N threads (None: not settable).
    threads_field: ClassVar[str | None] = None

    def __init__(
        self,
        model_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
    ) -> None:
        self.model_path = model_path
        self.inputs = inputs
        self.outputs = outputs

    @classmethod
    def open(
        cls,
        model_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        config: Any,
        context: LoadContext,
    ) -> Runtime:
        """Open a model: what the registry calls. The default passes the config to
        the constructor; a runtime that uses the context overrides this."""
        return cls(model_path, inputs, outputs, config)  # type: ignore[call-arg]

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when the runtime can be used here, else why not (for logs and status)."""

    @classmethod
    @abc.abstractmethod
    def library_version(cls) -> str: ...

    @abc.abstractmethod
    def run(self, feeds: Feeds) -> Feeds:
        """Run one (possibly batched) request; feeds are already validated."""

    def run_and_release(self, feeds: Feeds) -> Feeds:
        """`run`, then hand back to the allocator what this run grew the runtime's
        memory pools by. For requests far larger than usual: a pool that keeps its
        high-water mark would hold the agent above its soft limit after one burst."""
        return self.run(feeds)

    def family(self) -> str:
        """The kind of hardware/kernels that computes this runtime's outputs, which sets
        how far they may differ from the build machine's: "cpu", "cuda", "tensorrt"...
        (the golden replay picks its tolerance by it)."""
        return "cpu"

    def notices(self) -> list[Notice]:
        """What happened since the last call that the agent should report (each
        notice is returned once)."""
        return []

    def providers(self) -> list[str]:
        """The execution providers/delegates that really compute, best first (what
        status, state and telemetry report); a runtime without any: its name."""
        return [self.name]

    def describe(self) -> dict[str, Any]:
        """What the runtime chose (providers, threads...) for status and metrics."""
        return {"runtime": self.name, "version": self.library_version()}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the session; the object is unusable afterwards."""
