"""The golden rule on a real GPU: right models validate on CUDA, wrong ones are refused.

Skipped with the reason where onnxruntime has no CUDA execution provider (CI, a CPU
build); tests/gpu/README.md (h/rt) says how the GPU machine runs this tier. MiniLM
bundles come from the folder named by EDGERUN_GPU_MINILM (minilm-*.edgebundle, built
with `edge-export build models/minilm/recipe.toml`), as for tests/gpu/test_rt.py.

Each test prints the figures for the note: the max abs diff on CUDA against the CPU's
golden outputs, in steps where the output is INT8, beside what the build-time TF32
simulation measured (the bundle's figures.golden_replays).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent import bundle as B
from agent.golden import replay_golden
from agent.runtimes.ort import OrtConfig, OrtRuntime
from agent.signing import load_public_key
from tests.helpers import DEMO_PUB, SampleParts
from tests.wrong_models import perturbed_int8, swapped_labels

# Skipped with the reason where no CUDA provider can run: tests/gpu/conftest.py.
CUDA = OrtConfig(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def _on_cuda(path: Path, manifest: B.Manifest) -> OrtRuntime:
    runtime = OrtRuntime(path, manifest.inputs, manifest.outputs, CUDA)
    if runtime.family() != "cuda":
        runtime.close()
        pytest.fail(f"the CUDA provider did not take the session: {runtime.describe()}")
    return runtime


def _report(manifest: B.Manifest, directory: Path, model: Path) -> list[str]:
    runtime = _on_cuda(model, manifest)
    try:
        report = replay_golden(manifest, directory, runtime)
    finally:
        runtime.close()
    assert report is not None
    for r in report.outputs.values():
        steps = f" = {r.steps:.2f} steps" if r.steps is not None else ""
        if r.norm_error is not None:
            steps += f", relative L2 error {r.norm_error:.4g}"
        print(f"{manifest.name} on cuda: {r.name} max abs diff {r.max_abs_diff:.4g}{steps}, "
              f"allowed {r.allowance:.4g}, top-1 {r.top1}")  # fmt: skip
    simulated = manifest.figures.get("golden_replays", {}).get("onnx", {}).get("cuda")
    if simulated:
        print(f"{manifest.name} simulated at build (TF32): {simulated['max_abs_diff']}")
    return report.failures


def test_the_sample_validates_on_cuda(sample_parts: SampleParts) -> None:
    manifest = B.load_unpacked(sample_parts.directory)
    failures = _report(manifest, sample_parts.directory, sample_parts.directory / "model.onnx")
    assert failures == []


@pytest.mark.parametrize("wrong", ["swapped-labels", "perturbed-weights"])
def test_a_wrong_model_is_refused_on_cuda(sample_parts: SampleParts, tmp: Path, wrong: str) -> None:
    manifest = B.load_unpacked(sample_parts.directory)
    model = onnx.load(str(sample_parts.directory / "model.onnx"))
    bad = swapped_labels(model, 3, 8) if wrong == "swapped-labels" else perturbed_int8(model, 8)
    path = tmp / "wrong.onnx"
    onnx.save(bad, str(path))
    failures = _report(manifest, sample_parts.directory, path)
    assert failures and "exceeds the cuda bound" in failures[0], failures
    if wrong == "swapped-labels":
        assert any("top-1 agrees on" in f for f in failures), failures


@pytest.fixture
def minilm(tmp: Path) -> Iterator[list[tuple[B.Manifest, Path]]]:
    folder = os.environ.get("EDGERUN_GPU_MINILM")
    if not folder:
        pytest.skip("EDGERUN_GPU_MINILM (a folder with the MiniLM bundles) is not set")
    bundles = sorted(Path(folder).glob("minilm-*.edgebundle"))
    if not bundles:
        pytest.skip(f"no minilm-*.edgebundle in {folder}")
    unpacked = []
    for i, bundle in enumerate(bundles):
        dest = tmp / f"m{i}"
        verified = B.unpack_bundle(bundle, dest, [load_public_key(DEMO_PUB)])
        unpacked.append((verified.manifest, dest))
    yield unpacked
    for _, dest in unpacked:
        shutil.rmtree(dest, ignore_errors=True)


def test_minilm_validates_on_cuda(minilm: list[tuple[B.Manifest, Path]]) -> None:
    checked = 0
    for manifest, directory in minilm:
        if "onnx" not in manifest.formats:
            continue
        failures = _report(manifest, directory, directory / manifest.formats["onnx"])
        assert failures == [], (manifest.name, manifest.version, failures)
        checked += 1
    assert checked, "no MiniLM bundle with an ONNX model was given"


def test_minilm_with_perturbed_weights_is_refused_on_cuda(
    minilm: list[tuple[B.Manifest, Path]], tmp: Path
) -> None:
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    for manifest, directory in minilm:
        model = onnx.load(str(directory / manifest.formats["onnx"]))
        changed = 0
        # The float bundle's first weight matrices (word, position embeddings...) plus
        # noise of 5% of their spread: 0.038 relative L2 error per case on the CPU.
        for tensor in model.graph.initializer:
            w = numpy_helper.to_array(tensor)
            if w.dtype == np.float32 and w.ndim == 2 and changed < 4:
                noise = rng.normal(0, 0.05 * float(w.std()), w.shape).astype(np.float32)
                tensor.CopyFrom(numpy_helper.from_array(w + noise, tensor.name))
                changed += 1
        if changed:
            break
    else:
        pytest.skip("no MiniLM bundle here stores float weight matrices (INT8 only)")
    path = tmp / "wrong-minilm.onnx"
    onnx.save(model, str(path))
    assert _report(manifest, directory, path)
