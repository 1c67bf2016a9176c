"""Check request tensors against the manifest before they reach a runtime.

Each tensor spec says which axis counts cases (`batch_axis`): axis 0 for most
models, another axis for some (silero-vad's `state` is [2, B, 128]) and none for a
tensor every case shares (silero-vad's 0-d `sr`). The helpers here are the one place
that turns that axis into slices, so the request checks, the LiteRT slicing and
the packager's probe all count cases the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.bundle import TensorSpec
from agent.errors import InputMismatchError, TooLargeError


@functools.cache
def _dtype(name: str) -> np.dtype[Any]:
    return np.dtype(name)


def describe(spec: TensorSpec) -> str:
    return f"{spec.name} ({spec.dtype} {list(spec.shape)}{_axis_note(spec)})"


def _axis_note(spec: TensorSpec) -> str:
    # Axis 0 is what everyone assumes, so only the exceptions are spelled out.
    if spec.batch_axis == 0:
        return ""
    if not spec.shape:
        return ", a scalar"
    if spec.batch_axis is None:
        return ", no batch axis"
    return f", batch on axis {spec.batch_axis}"


def rows(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """Cases `start:stop` of `array` along its batch `axis` (a view, no copy)."""
    index = (slice(None),) * axis + (slice(start, stop),)
    view: np.ndarray = array[index]
    return view


def slice_feeds(
    specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray], start: int, stop: int
) -> dict[str, np.ndarray]:
    """Cases `start:stop` of every batched input; inputs without a batch axis go whole."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        array = feeds[spec.name]
        axis = spec.batch_axis
        out[spec.name] = array if axis is None else rows(array, axis, start, stop)
    return out


def batch_of(specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray]) -> int:
    """Cases in (already validated) feeds: the first batched input's size on its axis, else 1."""
    for spec in specs:
        axis = spec.batch_axis
        if axis is not None and spec.name in feeds and feeds[spec.name].ndim > axis:
            return int(feeds[spec.name].shape[axis])
    return 1


def validate_feeds(
    specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray], max_batch: int
) -> int:
    """Raise InputMismatchError naming the input, what was expected and what came.

    Returns the batch size, counted on each input's own batch axis; a request whose
    inputs have no batch axis at all is one case.
    """
    names = {s.name for s in specs}
    unknown = sorted(set(feeds) - names)
    if unknown:
        raise InputMismatchError(
            f"unknown input {unknown[0]!r}; the model takes "
            + ", ".join(describe(s) for s in specs)
        )
    batch: int | None = None
    first: TensorSpec | None = None
    for spec in specs:
        if spec.name not in feeds:
            raise InputMismatchError(f"missing input {describe(spec)}")
        array = feeds[spec.name]
        if array.dtype != _dtype(spec.dtype):
            raise InputMismatchError(
                f"input {spec.name!r}: expected dtype {spec.dtype}, got {array.dtype.name}"
            )
        if not spec.shape and array.ndim:
            raise InputMismatchError(
                f"input {spec.name!r}: expected a scalar (shape [], shared by all cases), "
                f"got shape {list(array.shape)}"
            )
        if array.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
        ):
            raise InputMismatchError(
                f"input {spec.name!r}: expected shape {list(spec.shape)} "
                f"(-1 = any{_axis_note(spec)}), got {list(array.shape)}"
            )
        axis = spec.batch_axis
        if axis is None:
            continue
        size = int(array.shape[axis])
        if batch is None or first is None:
            batch, first = size, spec
        elif size != batch:
            raise InputMismatchError(
                f"input {spec.name!r} has batch size {size} on axis {axis} "
                f"(shape {list(array.shape)}); input {first.name!r} has {batch} on axis "
                f"{first.batch_axis}: the batch axes of all inputs must agree"
            )
    if batch is None:
        return 1  # nothing counts cases: the request is one case
    if batch < 1:
        assert first is not None
        raise InputMismatchError(
            f"batch size is 0 (input {first.name!r}, axis {first.batch_axis}); "
            "send at least one case"
        )
    if batch > max_batch:
        raise TooLargeError(
            f"batch size {batch} is above the limit of {max_batch} (api.max_batch_size)"
        )
    return batch
