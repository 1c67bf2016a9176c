"""Fuzz the golden-file header reader that sizes the golden replay before it runs
(agent.footprint.golden_shapes): outside bytes in, a dict of shapes out, never an
exception, never a negative dimension.

    python tests/fuzz/fuzz_golden_shapes.py -runs=100000
"""

from __future__ import annotations

import io
import sys

import atheris

# Its dependencies first, uninstrumented: only the reader itself is measured.
import agent.bundle
import agent.memory
import agent.runtimes.base  # noqa: F401

with atheris.instrument_imports():
    from agent.footprint import golden_shapes


def test_one(data: bytes) -> None:
    shapes = golden_shapes(io.BytesIO(data))
    if not isinstance(shapes, dict):
        raise AssertionError(f"golden_shapes returned {type(shapes).__name__}")
    for name, shape in shapes.items():
        if not isinstance(name, str) or any(not isinstance(d, int) or d < 0 for d in shape):
            raise AssertionError(f"bad entry {name!r}: {shape!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
