"""Fuzz the request checks and the manifest's tensor list, batch axes included, with atheris.

Contract: whatever the specs and arrays, `validate_feeds` returns a batch size in
1..max_batch or raises InputMismatchError / TooLargeError (ServingError, the request
error root) with a message; when it accepts, every batched input holds that many
cases on its own axis and `slice_feeds` cuts one case without touching the shared
inputs. `_tensor_specs` on any JSON either raises SchemaError or returns specs whose
batch axis names a dynamic dimension. Anything else (IndexError, a numpy error...)
is a bug.

    python tests/fuzz/fuzz_tensors.py -runs=100000
"""

from __future__ import annotations

import json
import sys

import atheris

# Their dependencies first, uninstrumented: only the checks' own code is traced.
import numpy as np

import agent.errors
import agent.signing
import agent.version  # noqa: F401

with atheris.instrument_imports():
    from agent import bundle, tensors

from agent.errors import ServingError

DTYPES = ["float32", "int64", "uint8", "float16", "bool"]


def _specs(fdp: atheris.FuzzedDataProvider) -> tuple[bundle.TensorSpec, ...]:
    specs = []
    for i in range(fdp.ConsumeIntInRange(1, 3)):
        shape = tuple(
            fdp.PickValueInList([-1, 1, 2, 3]) for _ in range(fdp.ConsumeIntInRange(0, 3))
        )
        dynamic = [a for a, d in enumerate(shape) if d == -1]
        axis = fdp.PickValueInList([None, *dynamic]) if dynamic else None
        specs.append(bundle.TensorSpec(f"t{i}", fdp.PickValueInList(DTYPES), shape, None, axis))
    return tuple(specs)


def _feeds(
    fdp: atheris.FuzzedDataProvider, specs: tuple[bundle.TensorSpec, ...]
) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in specs:
        if fdp.ConsumeProbability() < 0.05:
            continue  # missing
        if fdp.ConsumeBool():  # follow the spec, dynamic dims and batch from the bytes
            shape = tuple(d if d != -1 else fdp.ConsumeIntInRange(0, 4) for d in spec.shape)
            dtype = spec.dtype
        else:
            shape = tuple(fdp.ConsumeIntInRange(0, 4) for _ in range(fdp.ConsumeIntInRange(0, 4)))
            dtype = fdp.PickValueInList(DTYPES)
        feeds[spec.name] = np.zeros(shape, dtype)
    if fdp.ConsumeProbability() < 0.05:
        feeds["extra"] = np.zeros((1,), np.float32)
    return feeds


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    specs = _specs(fdp)
    feeds = _feeds(fdp, specs)
    max_batch = fdp.ConsumeIntInRange(1, 8)
    try:
        batch = tensors.validate_feeds(specs, feeds, max_batch)
    except ServingError as exc:
        assert exc.message and exc.code in ("input.mismatch", "request.too_large"), exc
    else:
        assert 1 <= batch <= max_batch
        assert tensors.batch_of(specs, feeds) == batch
        one = tensors.slice_feeds(specs, feeds, 0, 1)
        for spec in specs:
            if spec.batch_axis is None:
                assert one[spec.name] is feeds[spec.name]
            else:
                assert feeds[spec.name].shape[spec.batch_axis] == batch
                assert one[spec.name].shape[spec.batch_axis] == 1
    # The rest of the bytes as a manifest's tensor list.
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):
        return
    try:
        parsed = bundle._tensor_specs(items, "inputs")
    except bundle.SchemaError as exc:
        assert str(exc)
    else:
        for spec in parsed:
            assert spec.batch_axis is None or spec.shape[spec.batch_axis] == -1


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
