"""The agent on a real NVIDIA GPU (onnxruntime-gpu): providers, validation, GPU memory.

Skipped where no CUDA execution provider can run (tests/gpu/conftest.py). MiniLM bundles
are large: give their folder in EDGERUN_GPU_MINILM (tests/gpu/README.md builds them);
without it those two cases are skipped with that reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import numpy_helper

from agent.bundle import load_unpacked
from agent.config.loader import parse_config
from agent.device_memory import NvmlMemory, detect
from agent.golden import GoldenMismatchError
from agent.memory import AdmissionError
from agent.runtimes import load_runtime
from agent.runtimes.base import RuntimeUnavailableError
from agent.runtimes.ort import OrtConfig, OrtRuntime
from agent.runtimes.ort_providers import (
    CPU,
    CUDA,
    TENSORRT,
    capi_directory,
    cuda_device_problem,
    library_problem,
)
from agent.service import Agent
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE, SampleParts, make_bundle, samples

GPU_FIRST = {"providers": [CUDA, CPU]}


def make_agent(tmp: Path, onnxruntime: dict[str, object], **sections: object) -> Agent:
    data: dict[str, object] = {
        "state_dir": str(tmp / "state"),
        "trust": {"public_keys": [str(DEMO_PUB)]},
        "api": {"socket": str(tmp / "api.sock")},
        "runtimes": {"onnxruntime": onnxruntime},
    }
    data.update(sections)
    return Agent(parse_config(data, {}))


def test_the_cuda_provider_libraries_and_device_are_there() -> None:
    capi = capi_directory()
    assert library_problem(CUDA, capi) is None
    assert cuda_device_problem(capi) is None


def test_tensorrt_without_its_libraries_is_skipped_with_why_and_cuda_serves(
    sample_parts: SampleParts, capfd: pytest.CaptureFixture[str]
) -> None:
    manifest = load_unpacked(sample_parts.directory)
    rt = OrtRuntime(sample_parts.directory / "model.onnx", manifest.inputs, manifest.outputs)
    described = rt.describe()
    if TENSORRT in described["providers_asked"]:
        pytest.skip("TensorRT's libraries are installed here: nothing is skipped")
    assert "libnvinfer" in described["providers_skipped"][TENSORRT]
    assert rt.providers()[0] == CUDA and rt.family() == "cuda"
    images, labels = samples()
    assert (rt.run({"input": images})["logits"].argmax(1) == labels).mean() >= 0.9
    # onnxruntime's own fallback banner never reaches stdout.
    assert "EP Error" not in capfd.readouterr().out


def test_a_provider_that_fails_to_open_falls_back_here_and_is_reported(
    sample_parts: SampleParts, monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> None:
    import agent.runtimes.ort as ort_module

    # Skip the library check: onnxruntime is asked for TensorRT and fails to load it.
    monkeypatch.setattr(ort_module, "system_problem", lambda _capi: lambda _p: None)
    if library_problem(TENSORRT, capi_directory()) is None:
        pytest.skip("TensorRT's libraries are installed here: it would not fail")
    agent = make_agent(tmp, {"providers": [TENSORRT, CUDA, CPU]}, model={"validate_golden": False})
    model = agent.admission.install(SAMPLE_BUNDLE)
    assert model.runtime.providers()[0] == CUDA
    fallbacks = [e for e in agent.events.recent if e.kind == "runtime.provider_fallback"]
    assert len(fallbacks) == 1 and fallbacks[0].data["provider"] == TENSORRT
    assert fallbacks[0].data["providers"][0] == CUDA


def test_a_required_provider_that_cannot_run_refuses_the_model(
    sample_parts: SampleParts,
) -> None:
    if library_problem(TENSORRT, capi_directory()) is None:
        pytest.skip("TensorRT's libraries are installed here")
    config = parse_config(
        {"runtimes": {"onnxruntime": {"providers": [TENSORRT], "require_providers": True}}}, {}
    )
    manifest = load_unpacked(sample_parts.directory)
    with pytest.raises(RuntimeUnavailableError, match="require_providers: TensorrtExecution"):
        load_runtime("onnxruntime", manifest, sample_parts.directory, config.runtimes)


def test_the_cuda_arena_is_bounded_by_the_gpu_cap(sample_parts: SampleParts) -> None:
    from agent.runtimes.base import LoadContext

    manifest = load_unpacked(sample_parts.directory)
    rt = OrtRuntime(
        sample_parts.directory / "model.onnx",
        manifest.inputs,
        manifest.outputs,
        OrtConfig(providers=[CUDA, CPU], gpu_mem_limit_mb=4096),
        LoadContext(device_memory_cap_bytes=256 << 20),
    )
    options = rt.session.get_provider_options()[CUDA]
    assert int(options["gpu_mem_limit"]) == 256 << 20
    assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_the_sample_validates_and_serves_on_cuda_with_its_gpu_memory_reported(
    tmp: Path,
) -> None:
    agent = make_agent(tmp, GPU_FIRST)
    model = agent.admission.install(SAMPLE_BUNDLE)
    assert model.runtime.family() == "cuda" and model.runtime.providers()[0] == CUDA
    images, labels = samples()
    _, out = agent.host.infer("digits", {"input": images})
    assert (out["logits"].argmax(1) == labels).mean() >= 0.9
    memory = model.summary()["memory"]
    # What the load added (>= 0: a CUDA context made by an earlier test is not counted
    # again); what the process holds is > 0, the context and the model's arena.
    assert memory["device_source"] == "nvml" and memory["device_mb"] >= 0
    nvml = detect(0)
    assert isinstance(nvml, NvmlMemory) and (nvml.process_bytes() or 0) > 0
    status = agent.status()["model"]
    assert status["providers"][0] == CUDA and "manifest_peak_mb" in status["memory"]


def _wrong_sample(parts: SampleParts, tmp: Path, key: Ed25519PrivateKey) -> Path:
    """The sample with classes 0 and 1 swapped at its output (a Gather on the logits):
    a wrong model whose golden outputs (the right model's) no longer match."""
    model = onnx.load(str(parts.directory / "model.onnx"))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    perm = np.arange(10, dtype=np.int64)
    perm[[0, 1]] = [1, 0]
    model.graph.initializer.append(numpy_helper.from_array(perm, "swap01"))
    model.graph.node.append(
        onnx.helper.make_node("Gather", [f"{out}_raw", "swap01"], [out], axis=1)
    )
    wrong = tmp / "model.onnx"
    onnx.save(model, str(wrong))
    files = {**parts.files(), "model.onnx": wrong}
    return make_bundle(parts, tmp / "wrong.edgebundle", key, files, version="9.0.0")


def test_a_wrong_model_is_still_refused_on_cuda(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = make_agent(tmp, GPU_FIRST)
    with pytest.raises(GoldenMismatchError):
        agent.admission.install(_wrong_sample(sample_parts, tmp, demo_key))
    assert agent.host.model is None
    assert [e.kind for e in agent.events.recent][-1] == "model.refused"


def test_admission_refuses_a_model_whose_gpu_cost_does_not_fit_the_cap(tmp: Path) -> None:
    memory = detect(0)
    assert isinstance(memory, NvmlMemory)
    agent = make_agent(tmp, GPU_FIRST, memory={"gpu_max_mb": 8})
    with pytest.raises(AdmissionError, match="of GPU memory .* above the GPU memory cap of 8.0 MB"):
        agent.admission.install(SAMPLE_BUNDLE)
    assert agent.host.model is None


def _minilm(kind: str) -> Path:
    folder = os.environ.get("EDGERUN_GPU_MINILM")
    if not folder:
        pytest.skip("EDGERUN_GPU_MINILM (a folder with the MiniLM bundles) is not set")
    found = sorted(Path(folder).glob(f"minilm-{kind}*.edgebundle"))
    if not found:
        pytest.skip(f"no minilm-{kind}*.edgebundle in {folder}")
    return found[0]


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_minilm_validates_and_serves_on_cuda(kind: str, tmp: Path) -> None:
    bundle = _minilm(kind)
    agent = make_agent(tmp, GPU_FIRST)
    model = agent.admission.install(bundle)
    assert CUDA in model.runtime.providers()
    golden = model.directory / (model.manifest.golden_inputs or "")
    with np.load(golden) as data:
        feeds = {k: data[k] for k in data.files}
    _, out = agent.host.infer(model.manifest.name, feeds)
    norms = np.linalg.norm(out["embedding"], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-2)  # L2-normalised sentence embeddings
