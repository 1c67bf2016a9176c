"""Execution providers: what is asked for is what can run here, and the agent knows why.

Provider lists are the ones real onnxruntime builds report:
- CPU wheel (onnxruntime 1.31.1, this machine; also nazdridoy/kokoro-tts#59):
  ['AzureExecutionProvider', 'CPUExecutionProvider']
- onnxruntime-gpu 1.31.1 on the H200 of shared/GPU.md (and ultralytics/ultralytics#19159,
  an RTX 4090, where the session then silently ran on ['CPUExecutionProvider']):
  ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']
- onnxruntime 1.2 GPU build (microsoft/onnxruntime#5337), CPU listed first:
  ['CPUExecutionProvider', 'CUDAExecutionProvider']

The library checks run the real dynamic loader on real ELF files: provider libraries
compiled here with gcc that name (DT_NEEDED) a TensorRT library that is then removed,
or a CUDA runtime whose device count says "no device" (error 100, what libcudart
answers on a machine without a GPU). No GPU is needed; tests/gpu/ runs the real ones.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.bundle import load_unpacked
from agent.config.loader import parse_config
from agent.runtimes import load_runtime
from agent.runtimes.base import LoadContext, RuntimeUnavailableError
from agent.runtimes.ort import (
    MB,
    OrtConfig,
    OrtRuntime,
    device_memory_limit,
    engine_cache_dir,
    provider_options,
    tensorrt_workspace,
)
from agent.runtimes.ort_providers import (
    CPU,
    CUDA,
    TENSORRT,
    capi_directory,
    cuda_device_problem,
    elf_needed,
    fallbacks,
    library_problem,
    plan_providers,
)
from tests.helpers import SampleParts, samples

CPU_BUILD = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
OLD_GPU_BUILD = ["CPUExecutionProvider", "CUDAExecutionProvider"]
DEFAULT = [TENSORRT, CUDA, CPU]


def test_the_cpu_build_serves_on_cpu_and_says_why_not_on_gpu() -> None:
    plan = plan_providers(DEFAULT, CPU_BUILD, lambda _p: None)
    assert plan.asked == (CPU,)
    assert set(plan.skipped) == {TENSORRT, CUDA}
    assert plan.skipped[CUDA] == (
        "not in this onnxruntime build (it has AzureExecutionProvider, CPUExecutionProvider)"
    )


def test_a_gpu_build_without_tensorrt_libraries_asks_for_cuda_then_cpu() -> None:
    why = {TENSORRT: "libonnxruntime_providers_tensorrt.so needs libnvinfer.so.10, ..."}
    plan = plan_providers(DEFAULT, GPU_BUILD, why.get)
    assert plan.asked == (CUDA, CPU)
    assert plan.skipped == why


def test_the_preference_order_wins_over_the_build_order() -> None:
    assert plan_providers(DEFAULT, OLD_GPU_BUILD, lambda _p: None).asked == (CUDA, CPU)


def test_required_providers_get_no_cpu_fallback() -> None:
    plan = plan_providers([CUDA], GPU_BUILD, lambda _p: None, cpu_fallback=False)
    assert plan.asked == (CUDA,)
    plan = plan_providers([CUDA], CPU_BUILD, lambda _p: None, cpu_fallback=False)
    assert plan.asked == () and CUDA in plan.skipped


def test_fallbacks_are_what_was_asked_and_is_not_used() -> None:
    # ultralytics#19159: asked for the GPU, the session reported CPU only.
    assert fallbacks([CUDA, CPU], [CPU]) == [CUDA]
    assert fallbacks([CUDA, CPU], [CUDA, CPU]) == []


def test_elf_needed_reads_what_readelf_reads() -> None:
    capi = capi_directory()
    assert capi is not None
    library = next(capi.glob("libonnxruntime.so.*"))
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed to compare with")
    out = subprocess.run(
        [readelf, "-d", str(library)], capture_output=True, text=True, check=True
    ).stdout
    expected = [
        line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line
    ]
    assert expected and elf_needed(library) == expected


def test_elf_needed_refuses_what_is_not_elf(tmp_path: Path) -> None:
    bogus = tmp_path / "libonnxruntime_providers_cuda.so"
    bogus.write_bytes(b"MZ not an ELF")
    from agent.runtimes.ort_providers import ElfError

    with pytest.raises(ElfError, match="not an ELF file"):
        elf_needed(bogus)
    assert library_problem(CUDA, tmp_path).startswith("cannot read libonnxruntime_providers_cuda")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A capi/ folder with provider libraries built here: TensorRT's names a
    libnvinfer.so.10 that is removed after linking; CUDA's names a libcudart.so.13 that
    answers cudaGetDeviceCount with error 100 (cudaErrorNoDevice)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the loader tests build their libraries with it")
    root = tmp_path_factory.mktemp("capi")
    src = root / "src"
    src.mkdir()

    def build(name: str, soname: str, code: str, *links: str) -> None:
        c = src / f"{name}.c"
        c.write_text(code)
        subprocess.run(
            [gcc, "-shared", "-fPIC", "-o", str(root / name), str(c), f"-Wl,-soname,{soname}",
             "-Wl,--no-as-needed", f"-L{root}", *links],
            check=True,
        )  # fmt: skip

    build("libnvinfer.so.10", "libnvinfer.so.10", "int createInferBuilder(void){return 0;}")
    build("libcudart.so.13", "libcudart.so.13",
          "int cudaGetDeviceCount(int *n){*n = 0; return 100;}")  # fmt: skip
    (root / "libcudart.so").symlink_to("libcudart.so.13")
    (root / "libnvinfer.so").symlink_to("libnvinfer.so.10")
    build("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_cuda.so",
          "int GetProvider(void){return 1;}", "-lcudart")  # fmt: skip
    build("libonnxruntime_providers_tensorrt.so", "libonnxruntime_providers_tensorrt.so",
          "int GetProvider(void){return 2;}", "-lnvinfer", "-lcudart")  # fmt: skip
    # TensorRT is "not installed": the library its provider needs is gone.
    (root / "libnvinfer.so").unlink()
    (root / "libnvinfer.so.10").unlink()
    return root


def _loader(root: Path):  # type: ignore[no-untyped-def]
    # What LD_LIBRARY_PATH=root would do, for libraries already named by soname.
    def load(name: str) -> object:
        local = root / name
        return ctypes.CDLL(str(local) if local.exists() else name)

    return load


def test_a_provider_whose_library_is_missing_is_skipped_with_the_soname(built: Path) -> None:
    assert elf_needed(built / "libonnxruntime_providers_tensorrt.so")[:2] == [
        "libnvinfer.so.10",
        "libcudart.so.13",
    ]
    why = library_problem(TENSORRT, built, _loader(built))
    assert why is not None
    assert why.startswith(
        "libonnxruntime_providers_tensorrt.so needs libnvinfer.so.10, which does not load: "
        "libnvinfer.so.10: cannot open shared object file"
    )
    assert library_problem(CUDA, built, _loader(built)) is None


def test_tensorrt_also_needs_what_cuda_needs(built: Path, tmp_path: Path) -> None:
    shutil.copy(built / "libonnxruntime_providers_tensorrt.so", tmp_path)
    why = library_problem(TENSORRT, tmp_path, _loader(built))
    assert (
        why
        == f"libonnxruntime_providers_cuda.so is not in {tmp_path} (a CPU-only onnxruntime build)"
    )


def test_no_gpu_is_said_in_cuda_terms(built: Path) -> None:
    assert cuda_device_problem(built, _loader(built)) == (
        "no usable GPU: cudaGetDeviceCount returned CUDA error 100"
    )


def test_cuda_options_bound_the_arena_by_the_device_cap() -> None:
    cap = LoadContext(device_memory_cap_bytes=512 * MB)
    assert device_memory_limit(OrtConfig(), cap) == 512 * MB
    assert device_memory_limit(OrtConfig(gpu_mem_limit_mb=256), cap) == 256 * MB
    assert device_memory_limit(OrtConfig(gpu_mem_limit_mb=4096), cap) == 512 * MB
    assert device_memory_limit(OrtConfig(), LoadContext()) == 0
    opts = provider_options(CUDA, OrtConfig(device_id=1, cudnn_conv_algo_search="heuristic"), cap)
    assert opts == {
        "device_id": "1",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "1",
        "gpu_mem_limit": str(512 * MB),
    }
    assert "gpu_mem_limit" not in provider_options(CUDA, OrtConfig(), LoadContext())


def test_tensorrt_precision_comes_from_the_bundle_and_caches_from_its_sha(
    tmp_path: Path,
) -> None:
    ctx = LoadContext(bundle_sha256="ab" * 32, cache_dir=tmp_path, precisions=("int8",))
    opts = provider_options(TENSORRT, OrtConfig(), ctx)
    assert (opts["trt_int8_enable"], opts["trt_fp16_enable"]) == ("1", "0")
    assert opts["trt_engine_cache_path"] == str(tmp_path / "tensorrt" / ("ab" * 32))
    assert opts["trt_timing_cache_path"] == opts["trt_engine_cache_path"]
    assert engine_cache_dir(ctx) == tmp_path / "tensorrt" / ("ab" * 32)
    # A float bundle runs as shipped; config can forbid what a bundle allows.
    fp32 = provider_options(TENSORRT, OrtConfig(), LoadContext())
    assert (fp32["trt_int8_enable"], fp32["trt_fp16_enable"]) == ("0", "0")
    assert "trt_engine_cache_path" not in fp32
    mixed = LoadContext(precisions=("fp16", "int8"))
    off = provider_options(TENSORRT, OrtConfig(tensorrt_fp16=False), mixed)
    assert (off["trt_int8_enable"], off["trt_fp16_enable"]) == ("1", "0")
    assert tensorrt_workspace(OrtConfig(), LoadContext(device_memory_cap_bytes=256 * MB)) == (
        256 * MB
    )
    assert tensorrt_workspace(OrtConfig(), LoadContext()) == 1024 * MB


def test_on_this_cpu_build_the_session_reports_what_it_skipped(sample_parts: SampleParts) -> None:
    manifest = load_unpacked(sample_parts.directory)
    rt = OrtRuntime(sample_parts.directory / "model.onnx", manifest.inputs, manifest.outputs)
    images, _ = samples()
    assert rt.run({"input": images})["logits"].shape == (len(images), 10)
    described = rt.describe()
    assert rt.providers() == described["providers"] == [CPU]
    assert described["providers_asked"] == [CPU]
    assert "not in this onnxruntime build" in described["providers_skipped"][CUDA]
    assert rt.notices() == [] and rt.family() == "cpu"


def test_a_required_provider_this_device_cannot_run_refuses_the_model(
    sample_parts: SampleParts,
) -> None:
    config = parse_config(
        {"runtimes": {"onnxruntime": {"providers": [CUDA], "require_providers": True}}},
        environ={},
    )
    manifest = load_unpacked(sample_parts.directory)
    with pytest.raises(RuntimeUnavailableError) as info:
        load_runtime("onnxruntime", manifest, sample_parts.directory, config.runtimes)
    assert str(info.value).startswith(
        "runtimes.onnxruntime.require_providers: CUDAExecutionProvider cannot run here: "
        "not in this onnxruntime build"
    )


def test_a_provider_that_fails_to_open_falls_back_to_the_next_and_says_so(
    sample_parts: SampleParts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the planner, onnxruntime is asked for a provider this build lacks: it opens
    the session without it, only warning (what ultralytics#19159 saw on a GPU build).
    The runtime notices from session.get_providers() and keeps a notice for the
    agent's event; required providers refuse. (A provider whose session creation
    raises, TensorRT without its libraries, is the GPU tier's case.)"""
    import agent.runtimes.ort as ort_module
    from agent.runtimes.ort_providers import ProviderPlan

    monkeypatch.setattr(ort_module, "plan_for", lambda _cfg, _avail: ProviderPlan((CUDA, CPU)))
    manifest = load_unpacked(sample_parts.directory)
    rt = OrtRuntime(sample_parts.directory / "model.onnx", manifest.inputs, manifest.outputs)
    assert rt.providers() == [CPU]
    [notice] = rt.notices()
    assert notice.kind == "provider_fallback"
    assert notice.fields["provider"] == CUDA and notice.fields["providers"] == [CPU]
    assert notice.message == f"{CUDA} failed (onnxruntime did not take it); serving on {CPU}"
    assert rt.notices() == []  # each notice is reported once
    strict = OrtConfig(providers=[CUDA, CPU], require_providers=True)
    with pytest.raises(
        RuntimeUnavailableError, match=f"require_providers: onnxruntime did not take {CUDA}"
    ):
        OrtRuntime(sample_parts.directory / "model.onnx", manifest.inputs, manifest.outputs, strict)


def test_an_agent_required_to_serve_on_cuda_refuses_to_start_on_a_cpu_build(tmp: Path) -> None:
    from tests.helpers import base_config, running_agent

    extra = (
        '[runtimes.onnxruntime]\nproviders = ["CUDAExecutionProvider"]\nrequire_providers = true\n'
    )
    try:
        with running_agent(tmp, base_config(tmp, extra=extra)) as agent:
            raise AssertionError(f"the agent started:\n{agent.output()}")
    except AssertionError as exc:
        text = str(exc)
    assert "agent exited with 1" in text
    assert "cannot start [" in text
    assert "require_providers: CUDAExecutionProvider cannot run here" in text
    assert "Traceback" not in text
