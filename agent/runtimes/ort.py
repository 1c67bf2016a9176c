"""ONNX Runtime: execution providers from a preference list, threads, arenas."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from agent.bundle import TensorSpec
from agent.config.typed import constraint
from agent.runtimes import register
from agent.runtimes.base import Feeds, InferenceError, ModelLoadError, Runtime, installed

log = logging.getLogger(__name__)

# Fastest first: TensorRT on Jetson, then CUDA, then the CPU that is always there.
DEFAULT_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

# Execution provider -> tolerance family (agent.runtimes.base.Runtime.family).
PROVIDER_FAMILY = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
}


@dataclass(frozen=True)
class OrtConfig:
    providers: list[str] = field(default_factory=lambda: list(DEFAULT_PROVIDERS))
    # 0 lets ONNX Runtime pick (one thread per physical core).
    intra_op_threads: int = constraint(0, ge=0, le=256)
    inter_op_threads: int = constraint(0, ge=0, le=256)
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # Idle intra-op threads spin for a while waiting for more work: lowest latency on a
    # dedicated device, but on a small board they steal the CPU the caller (or a camera
    # pipeline) needs next. False makes them sleep at once.
    allow_spinning: bool = True
    # The arena keeps freed blocks for reuse (faster); the agent shrinks it after
    # requests far larger than usual, so a burst does not pin RSS at its peak.
    cpu_mem_arena: bool = True
    mem_pattern: bool = True
    arena_extend_strategy: Literal["next_power_of_two", "same_as_requested"] = "next_power_of_two"


@register
class OrtRuntime(Runtime):
    name: ClassVar[str] = "onnxruntime"
    format: ClassVar[str] = "onnx"
    platform: ClassVar[str] = "onnxruntime_onnx"
    config_type: ClassVar[type[Any]] = OrtConfig
    tunable: ClassVar[tuple[str, ...]] = ("intra_op_threads",)
    readable: ClassVar[tuple[str, ...]] = (
        "providers",
        "inter_op_threads",
        "execution_mode",
        "graph_optimization",
        "allow_spinning",
        "cpu_mem_arena",
    )
    threads_field: ClassVar[str | None] = "intra_op_threads"

    def __init__(
        self,
        model_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        config: OrtConfig | None = None,
    ) -> None:
        super().__init__(model_path, inputs, outputs)
        import onnxruntime as ort

        cfg = config or OrtConfig()
        options = ort.SessionOptions()
        options.intra_op_num_threads = cfg.intra_op_threads
        options.inter_op_num_threads = cfg.inter_op_threads
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if cfg.execution_mode == "parallel"
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.graph_optimization]
        options.enable_cpu_mem_arena = cfg.cpu_mem_arena
        options.enable_mem_pattern = cfg.mem_pattern
        options.log_severity_level = 3
        if not cfg.allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if cfg.cpu_mem_arena and cfg.arena_extend_strategy == "same_as_requested":
            # Growing the arena by exactly what is asked keeps RSS close to the need,
            # at some speed cost; ORT only offers it through a shared env allocator.
            _register_same_as_requested_cpu_arena(ort)
            options.add_session_config_entry("session.use_env_allocators", "1")
        self.providers = choose_providers(cfg.providers, ort.get_available_providers())
        provider_options: list[dict[str, str]] = []
        for provider in self.providers:
            opts: dict[str, str] = {}
            if provider == "CUDAExecutionProvider":
                opts["arena_extend_strategy"] = (
                    "kNextPowerOfTwo"
                    if cfg.arena_extend_strategy == "next_power_of_two"
                    else "kSameAsRequested"
                )
            provider_options.append(opts)
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                sess_options=options,
                providers=self.providers,
                provider_options=provider_options,
            )
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph
            raise ModelLoadError(f"onnxruntime refused {model_path.name}: {exc}") from exc
        self.config = cfg
        model_inputs = [i.name for i in self.session.get_inputs()]
        model_outputs = [o.name for o in self.session.get_outputs()]
        want_in = [s.name for s in inputs]
        if sorted(model_inputs) != sorted(want_in):
            raise ModelLoadError(
                f"model inputs {model_inputs} differ from the manifest's {want_in}"
            )
        missing = [s.name for s in outputs if s.name not in model_outputs]
        if missing:
            raise ModelLoadError(f"model has no outputs named {missing}; it has {model_outputs}")
        self._output_names = [s.name for s in outputs]
        # Kept for describe(): status may read a runtime that a swap is closing.
        self._providers = list(self.session.get_providers())
        # Shrinking returns the arena's unused extensions at the end of a run: kept
        # for big requests only, as re-growing it costs small ones their speed.
        self._release = ort.RunOptions()
        if cfg.cpu_mem_arena:
            self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        log.info("onnxruntime session for %s on %s", model_path.name, self.session.get_providers())

    @classmethod
    def unavailable_reason(cls) -> str | None:
        # Look, don't import: importing onnxruntime costs ~20 MB of RSS, and a build
        # that crashes on this CPU must not take down an agent serving with LiteRT.
        if not installed("onnxruntime"):
            return "onnxruntime is not installed; pip install 'edgerun[device]'"
        return None

    @classmethod
    def library_version(cls) -> str:
        import onnxruntime

        return str(onnxruntime.__version__)

    def run(self, feeds: Feeds) -> Feeds:
        try:
            results = self.session.run(self._output_names, feeds)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def run_and_release(self, feeds: Feeds) -> Feeds:
        try:
            results = self.session.run(self._output_names, feeds, self._release)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def family(self) -> str:
        # The first provider the session really took computes (nearly) every node.
        first = self._providers[0] if self._providers else "CPUExecutionProvider"
        return PROVIDER_FAMILY.get(first, "cpu")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "providers": list(self._providers),
            "intra_op_threads": self.config.intra_op_threads,
            "inter_op_threads": self.config.inter_op_threads,
            "graph_optimization": self.config.graph_optimization,
            "cpu_mem_arena": self.config.cpu_mem_arena,
            "allow_spinning": self.config.allow_spinning,
        }

    def close(self) -> None:
        # Idempotent: the session goes with its last reference (the arena with it).
        self.__dict__.pop("session", None)


_ENV_ARENA: set[str] = set()  # registered once per process


def _register_same_as_requested_cpu_arena(ort: Any) -> None:
    if _ENV_ARENA:
        return
    mem_info = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    # (max_mem=0: no limit, strategy 1 = kSameAsRequested, defaults for the rest)
    ort.create_and_register_allocator(mem_info, ort.OrtArenaCfg(0, 1, -1, -1))
    _ENV_ARENA.add("cpu")


def choose_providers(preferred: list[str], available: list[str]) -> list[str]:
    """Keep the preference order, drop what this build lacks; CPU is always the fallback."""
    chosen = [p for p in preferred if p in available]
    skipped = [p for p in preferred if p not in available]
    if skipped:
        log.info("execution providers not in this onnxruntime build: %s", ", ".join(skipped))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen
