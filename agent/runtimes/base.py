"""The interface every runtime implements, and the errors it raises."""

from __future__ import annotations

import abc
import importlib.util
import sys
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


class Runtime(abc.ABC):
    """One loaded model in one runtime. `run` must be safe to call from several threads."""

    name: ClassVar[str]
    format: ClassVar[str]  # the bundle format it runs: "onnx" or "tflite"

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

    def describe(self) -> dict[str, Any]:
        """What the runtime chose (providers, threads...) for status and metrics."""
        return {"runtime": self.name, "version": self.library_version()}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the session; the object is unusable afterwards."""
