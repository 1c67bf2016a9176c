"""The GPU tier: every test under tests/gpu/ needs onnxruntime's CUDA execution provider
(the onnxruntime-gpu wheel, or JetPack's) and a GPU it can open. Elsewhere (CI, a CPU
build) each is skipped with the reason; tests/gpu/README.md says how they are run on
the GPU machine."""

from __future__ import annotations

import pytest


def cuda_missing() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return f"no CUDAExecutionProvider in this onnxruntime build ({', '.join(available)})"
    from agent.runtimes.ort_providers import capi_directory, system_problem

    why = system_problem(capi_directory())("CUDAExecutionProvider")
    return None if why is None else f"the CUDA provider cannot run here: {why}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = __file__.rsplit("/", 1)[0]
    why = None
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if why is None:
            why = cuda_missing() or ""
        if why:
            item.add_marker(pytest.mark.skip(reason=why))
