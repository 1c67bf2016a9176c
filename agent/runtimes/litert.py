"""LiteRT (TensorFlow Lite): ai_edge_litert, falling back to tflite_runtime, with XNNPACK.

The API speaks the manifest's (float) dtypes; full-integer models take int8/uint8
tensors, so inputs are quantized and outputs dequantized here with the tensor's
own scale and zero point.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.bundle import TensorSpec
from agent.config.typed import constraint
from agent.runtimes import register
from agent.runtimes.base import Feeds, InferenceError, ModelLoadError, Runtime, installed
from agent.tensors import batch_of, rows, slice_feeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiteRTConfig:
    threads: int = constraint(1, ge=1, le=64)
    # XNNPACK is LiteRT's fast CPU delegate; off only to debug numerical differences.
    xnnpack: bool = True


def _interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError as exc:
        raise ImportError(
            "neither ai_edge_litert nor tflite_runtime is installed; pip install 'edgerun[litert]'"
        ) from exc


@register
class LiteRTRuntime(Runtime):
    name: ClassVar[str] = "litert"
    format: ClassVar[str] = "tflite"
    platform: ClassVar[str] = "tflite"
    config_type: ClassVar[type[Any]] = LiteRTConfig
    tunable: ClassVar[tuple[str, ...]] = ("threads",)
    readable: ClassVar[tuple[str, ...]] = ("xnnpack",)
    threads_field: ClassVar[str | None] = "threads"

    def __init__(
        self,
        model_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        config: LiteRTConfig | None = None,
    ) -> None:
        super().__init__(model_path, inputs, outputs)
        cfg = config or LiteRTConfig()
        self.config = cfg
        interpreter_cls, self.package = _interpreter_class()
        kwargs: dict[str, Any] = {"model_path": str(model_path), "num_threads": cfg.threads}
        if not cfg.xnnpack:
            kwargs["experimental_op_resolver_type"] = _builtin_without_defaults(self.package)
        try:
            self.interpreter = interpreter_cls(**kwargs)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT refused {model_path.name}: {exc}") from exc
        details_in = self.interpreter.get_input_details()
        details_out = self.interpreter.get_output_details()
        if len(details_in) != len(inputs) or len(details_out) != len(outputs):
            raise ModelLoadError(
                f"model has {len(details_in)} inputs/{len(details_out)} outputs; the manifest "
                f"lists {len(inputs)}/{len(outputs)}"
            )
        # TFLite renames tensors on conversion ("serving_default_x:0"), so the
        # manifest's order is the contract; exact name matches win where they exist.
        self._in = _match(inputs, details_in)
        self._out = _match(outputs, details_out)
        # One interpreter is not re-entrant: requests take turns.
        self._lock = threading.Lock()
        # Converters often freeze the batch axis (a Flatten becomes a fixed reshape);
        # such models run a larger request in slices of their own batch size, cut
        # on each tensor's own batch axis. Inputs without one go whole to every slice.
        self._fixed_batch = _frozen_batch(self._in)
        log.info(
            "LiteRT (%s) interpreter for %s, %d thread(s)",
            self.package,
            model_path.name,
            cfg.threads,
        )

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was frozen at, or None if its batch axis is dynamic."""
        return self._fixed_batch

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if installed("ai_edge_litert") or installed("tflite_runtime"):
            return None
        return (
            "neither ai_edge_litert nor tflite_runtime is installed; pip install 'edgerun[litert]'"
        )

    @classmethod
    def library_version(cls) -> str:
        _, package = _interpreter_class()
        if package == "ai_edge_litert":
            from importlib.metadata import version

            return f"ai-edge-litert {version('ai-edge-litert')}"
        from importlib.metadata import version

        return f"tflite-runtime {version('tflite-runtime')}"

    def run(self, feeds: Feeds) -> Feeds:
        batch = batch_of(self.inputs, feeds)
        with self._lock:
            try:
                fixed = self._fixed_batch
                if fixed is None or batch == fixed:
                    return self._invoke(feeds)
                parts = []
                for start in range(0, batch, fixed):
                    chunk = slice_feeds(self.inputs, feeds, start, start + fixed)
                    got = min(fixed, batch - start)
                    if got < fixed:
                        chunk = {
                            s.name: _pad(chunk[s.name], s.batch_axis, fixed - got)
                            if s.batch_axis is not None
                            else chunk[s.name]
                            for s in self.inputs
                        }
                    result = self._invoke(chunk)
                    parts.append(slice_feeds(self.outputs, result, 0, got))
                return {
                    s.name: parts[0][s.name]  # shared by every slice: the first one's
                    if s.batch_axis is None
                    else np.concatenate([p[s.name] for p in parts], axis=s.batch_axis)
                    for s in self.outputs
                }
            except (ValueError, RuntimeError) as exc:
                raise InferenceError(f"LiteRT failed on a batch of {batch}: {exc}") from exc

    def _invoke(self, feeds: Feeds) -> Feeds:
        for spec, detail in self._in:
            self._resize(detail, feeds[spec.name].shape)
        for spec, detail in self._in:
            # A slice on a batch axis other than 0 is a strided view; LiteRT copies
            # from a contiguous buffer.
            data = np.asarray(_quantize(feeds[spec.name], detail), order="C")
            self.interpreter.set_tensor(detail["index"], data)
        self.interpreter.invoke()
        out = {
            spec.name: _dequantize(self.interpreter.get_tensor(detail["index"]), detail, spec)
            for spec, detail in self._out
        }
        return out

    def _resize(self, detail: dict[str, Any], shape: tuple[int, ...]) -> None:
        if tuple(detail["shape"]) == tuple(shape):
            return
        self.interpreter.resize_tensor_input(detail["index"], list(shape), strict=False)
        self.interpreter.allocate_tensors()
        # Details (shapes) change after a resize; refresh our copies.
        fresh_in = {d["index"]: d for d in self.interpreter.get_input_details()}
        fresh_out = {d["index"]: d for d in self.interpreter.get_output_details()}
        self._in = [(s, fresh_in[d["index"]]) for s, d in self._in]
        self._out = [(s, fresh_out[d["index"]]) for s, d in self._out]

    def providers(self) -> list[str]:
        # XNNPACK is applied as the default delegate; without it, LiteRT's builtin kernels.
        return ["xnnpack" if self.config.xnnpack else "builtin"]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "package": self.package,
            "threads": self.config.threads,
            "xnnpack": self.config.xnnpack,
        }

    def close(self) -> None:
        del self.interpreter


def _match(
    specs: tuple[TensorSpec, ...], details: list[dict[str, Any]]
) -> list[tuple[TensorSpec, dict[str, Any]]]:
    by_name = {d["name"]: d for d in details}
    if all(s.name in by_name for s in specs):
        return [(s, by_name[s.name]) for s in specs]
    ordered = sorted(details, key=lambda d: d["index"])
    return list(zip(specs, ordered, strict=True))


def _frozen_batch(matched: list[tuple[TensorSpec, dict[str, Any]]]) -> int | None:
    """The batch size the model was frozen at, read on the first batched input's axis.

    None when no input has a batch axis (nothing to slice) or any batched input's
    batch dimension is still dynamic in the model (it takes a request whole).
    """
    frozen: int | None = None
    for spec, detail in matched:
        axis = spec.batch_axis
        if axis is None:
            continue
        signature = detail.get("shape_signature", detail["shape"])
        if len(signature) <= axis or int(signature[axis]) == -1:
            return None
        if frozen is None:
            frozen = int(detail["shape"][axis])
    return frozen


def _pad(array: np.ndarray, axis: int, count: int) -> np.ndarray:
    """Repeat the last case `count` times along `axis` to fill a frozen batch."""
    last = rows(array, axis, array.shape[axis] - 1, array.shape[axis])
    padded: np.ndarray = np.concatenate([array, np.repeat(last, count, axis=axis)], axis=axis)
    return padded


def _quantize(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if array.dtype == dtype:
        return array
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype in (np.int8, np.uint8, np.int16) and scale:
        info = np.iinfo(dtype)
        q = np.round(array / scale + zero)
        quantized: np.ndarray = np.clip(q, info.min, info.max).astype(dtype)
        return quantized
    converted: np.ndarray = array.astype(dtype)
    return converted


def _dequantize(array: np.ndarray, detail: dict[str, Any], spec: TensorSpec) -> np.ndarray:
    # get_tensor returns a copy, so the result outlives the next invoke().
    target = np.dtype(spec.dtype)
    scale, zero = detail.get("quantization", (0.0, 0))
    if array.dtype != target and array.dtype.kind in "iu" and target.kind == "f" and scale:
        real: np.ndarray = ((array.astype(np.float32) - zero) * scale).astype(target)
        return real
    same: np.ndarray = array.astype(target, copy=False)
    return same


def _builtin_without_defaults(package: str) -> Any:
    if package == "ai_edge_litert":
        from ai_edge_litert.interpreter import OpResolverType
    else:
        from tflite_runtime.interpreter import OpResolverType
    return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
