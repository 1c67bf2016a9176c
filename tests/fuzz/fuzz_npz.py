"""Fuzz the golden .npz header reader (agent.npz.inspect_npz), which the bundle reader
and the golden replay's sizing both use before numpy allocates anything: outside bytes
in, array headers or a GoldenFileError out, nothing else; no negative dimension, no
declared size over the cap.

    python tests/fuzz/fuzz_npz.py -runs=100000
"""

from __future__ import annotations

import io
import sys

import atheris

# Its dependencies first, uninstrumented: only the reader itself is measured.
from agent.bundle_errors import GoldenFileError

with atheris.instrument_imports():
    from agent.npz import inspect_npz

MAX_ARRAYS, MAX_BYTES = 64, 64 << 20


def test_one(data: bytes) -> None:
    try:
        headers = inspect_npz(io.BytesIO(data), 0, len(data), "fuzz.npz", MAX_ARRAYS, MAX_BYTES)
    except GoldenFileError:
        return
    if len(headers) > MAX_ARRAYS:
        raise AssertionError(f"{len(headers)} arrays passed a cap of {MAX_ARRAYS}")
    for name, head in headers.items():
        if any(not isinstance(d, int) or d < 0 for d in head.shape):
            raise AssertionError(f"bad shape for {name!r}: {head.shape!r}")
        if head.nbytes > MAX_BYTES:
            raise AssertionError(f"{name!r} declares {head.nbytes} bytes over the cap")


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
