"""Check request tensors against the manifest before they reach a runtime."""

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
    return f"{spec.name} ({spec.dtype} {list(spec.shape)})"


def validate_feeds(
    specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray], max_batch: int
) -> int:
    """Raise InputMismatchError naming the input, what was expected and what came.

    Returns the batch size (axis 0) shared by all inputs.
    """
    names = {s.name for s in specs}
    unknown = sorted(set(feeds) - names)
    if unknown:
        raise InputMismatchError(
            f"unknown input {unknown[0]!r}; the model takes "
            + ", ".join(describe(s) for s in specs)
        )
    batch: int | None = None
    for spec in specs:
        if spec.name not in feeds:
            raise InputMismatchError(f"missing input {describe(spec)}")
        array = feeds[spec.name]
        if array.dtype != _dtype(spec.dtype):
            raise InputMismatchError(
                f"input {spec.name!r}: expected dtype {spec.dtype}, got {array.dtype.name}"
            )
        if array.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
        ):
            raise InputMismatchError(
                f"input {spec.name!r}: expected shape {list(spec.shape)} (-1 = any), "
                f"got {list(array.shape)}"
            )
        rows = int(array.shape[0]) if array.ndim else 1
        if batch is None:
            batch = rows
        elif rows != batch:
            raise InputMismatchError(
                f"input {spec.name!r} has batch size {rows}; other inputs have {batch}"
            )
    batch = batch or 0
    if batch < 1:
        raise InputMismatchError("batch size is 0; send at least one row")
    if batch > max_batch:
        raise TooLargeError(f"batch size {batch} is above the limit of {max_batch}")
    return batch
