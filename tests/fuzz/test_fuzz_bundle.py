"""The bundle reader under a bounded, fixed-seed fuzz run: only BundleError may come out."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fuzz import run_harness
from tests.helpers import SampleParts, make_bundle


def _seeds(parts: SampleParts, key: Ed25519PrivateKey, tmp: Path) -> list[bytes]:
    """A small valid bundle (a stub model keeps it ~10 KB), its manifest and a golden file."""
    (tmp / "model.onnx").write_bytes(b"not really onnx")
    # Only what the ONNX format needs: the built sample also carries its TFLite model
    # and the build report (a 45 KB PNG among them), which would crowd out the fuzzer.
    kept = ("golden/inputs.npz", "golden/outputs-onnx.npz")
    files = {**{n: parts.directory / n for n in kept}, "model.onnx": tmp / "model.onnx"}
    body = parts.body(formats={"onnx": "model.onnx"})
    body["golden"] = {**body["golden"], "outputs": {"onnx": "golden/outputs-onnx.npz"}}
    bundle = make_bundle(parts, tmp / "seed.edgebundle", key, files=files, **body).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        manifest = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
    assert json.loads(manifest)["name"] == "digits"
    golden = (parts.directory / "golden/outputs-onnx.npz").read_bytes()
    return [b"\x00" + bundle, b"\x01" + manifest, b"\x02" + golden]


def test_fuzz_bundle_reader(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    seeds = _seeds(sample_parts, demo_key, tmp)
    assert len(seeds[0]) < 16384
    result = run_harness("bundle", runs=4000, max_len=16384, seeds=seeds, workdir=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Done 4000 runs" in result.stderr
