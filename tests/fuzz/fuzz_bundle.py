"""Fuzz the bundle reader: bytes from outside must meet a BundleError, never anything else.

The first byte picks the entry point, so the parsers behind the signature are
reached too (a fuzzer cannot forge an ed25519 signature):

    0  the bytes are a bundle file        -> verify_bundle
    1  the bytes are a manifest.json      -> parse_manifest
    2  the bytes are a golden .npz file   -> inspect_npz

    python tests/fuzz/fuzz_bundle.py -runs=100000 [corpus_dir]
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import atheris

# Imported before instrumenting, so only the reader's own modules are instrumented.
import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
import numpy  # noqa: F401

with atheris.instrument_imports(
    include=[
        "agent.bundle",
        "agent.bundle_errors",
        "agent.names",
        "agent.npz",
        "agent.strictjson",
        "agent.ustar",
        "agent.version",
    ]
):
    from agent.bundle import BundleError, Limits, parse_manifest, verify_bundle
    from agent.npz import inspect_npz

from agent.signing import load_public_key

ROOT = Path(__file__).resolve().parents[2]
KEYS = [load_public_key(ROOT / "models/keys/demo-INSECURE.pub")]
LIMITS = Limits(max_golden_bytes=1 << 20)
_fd, _name = tempfile.mkstemp(prefix="fuzz-bundle-", suffix=".edgebundle")
PATH = Path(_name)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    try:
        if mode == 0:
            os.ftruncate(_fd, 0)
            os.pwrite(_fd, body, 0)
            verify_bundle(PATH, KEYS, LIMITS)
        elif mode == 1:
            parse_manifest(body)
        else:
            inspect_npz(io.BytesIO(body), 0, len(body), "fuzz.npz", 64, 1 << 20)
    except BundleError as exc:
        if not exc.code.startswith("bundle.") or not str(exc):
            raise AssertionError(f"refusal without a code or message: {exc!r}") from exc


def main() -> None:
    try:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
    finally:
        PATH.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
