"""Fuzz what the update watchdog does with a candidate's answers (agent.update.trial's
bad-answer check and top-1 count, agent.update.shadow's comparisons): arrays of any
dtype, shape and bit pattern built from the fuzz bytes, as a hostile model can answer.
Contract: nothing raises; the bad-answer check equals a value-by-value reference;
agreement stays within 0..rows; cosine is finite and within [-1, 1].

    python tests/fuzz/fuzz_watch.py -runs=100000
"""

from __future__ import annotations

import sys
import warnings

import atheris
import numpy as np

with atheris.instrument_imports():
    from agent.update.shadow import cosine, top1_agreement
    from agent.update.trial import _top1, answer_is_bad

DTYPES = [np.float16, np.float32, np.float64, np.complex64, np.int64, np.uint8, np.bool_]


def _array(fdp: atheris.FuzzedDataProvider) -> np.ndarray:
    dtype = np.dtype(DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)])
    shape = tuple(fdp.ConsumeIntInRange(0, 12) for _ in range(fdp.ConsumeIntInRange(0, 3)))
    count = int(np.prod(shape, dtype=np.int64))
    raw = fdp.ConsumeBytes(count * dtype.itemsize)
    raw += b"\0" * (count * dtype.itemsize - len(raw))
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    if fdp.ConsumeBool() and array.ndim == 2:
        array = np.asfortranarray(array)
    return array


def _reference_bad(outputs: dict[str, np.ndarray]) -> bool:
    if not outputs:
        return True
    for a in outputs.values():
        if a.size == 0:
            return True
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return True
    return False


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    served = {"y": _array(fdp)}
    candidate = {"y": _array(fdp)} if fdp.ConsumeBool() else {"y": served["y"].copy()}
    if fdp.ConsumeBool():
        candidate["z"] = _array(fdp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow in a reference sum is not a bug here
        want = _reference_bad(candidate)
    got = answer_is_bad(candidate)
    if got != want:
        raise AssertionError(f"answer_is_bad {got} != reference {want} for {candidate!r}")
    classes = served["y"].shape[-1] if served["y"].ndim else 0
    if classes:
        counted = _top1(candidate, "y", classes)
        if counted is not None:
            total = counted if isinstance(counted, list) else [1]
            if isinstance(counted, int) and not 0 <= counted < classes:
                raise AssertionError(f"top-1 {counted} outside 0..{classes - 1}")
            if sum(total) < 1:
                raise AssertionError(f"top-1 counts {counted} for {candidate['y']!r}")
    agree, rows = top1_agreement(served, candidate, "y")
    if not (rows >= 1 and 0 <= agree <= rows):
        raise AssertionError(f"agreement {agree}/{rows}")
    value = cosine(served, candidate, sorted(candidate))
    if not (np.isfinite(value) and -1 - 1e-9 <= value <= 1 + 1e-9):
        raise AssertionError(f"cosine {value!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
