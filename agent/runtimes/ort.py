"""ONNX Runtime: execution providers from a preference list, threads, arenas.

Providers are planned before the session opens (agent/runtimes/ort_providers.py:
the build has it, its libraries load, a GPU is there; each one skipped is logged
with why), opened with onnxruntime's own silent fallback off (it prints a banner on
stdout and, at run time, would switch providers under a validated model), and
falling back here instead, one provider at a time, each fallback logged and kept as
a notice the agent emits as an event. What the session really uses is reported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from agent.bundle import TensorSpec
from agent.config.typed import constraint
from agent.runtimes import register
from agent.runtimes.base import (
    Feeds,
    InferenceError,
    LoadContext,
    ModelLoadError,
    Notice,
    Runtime,
    RuntimeUnavailableError,
    installed,
)
from agent.runtimes.ort_providers import (
    CPU,
    CUDA,
    TENSORRT,
    ProviderPlan,
    capi_directory,
    fallbacks,
    first_line,
    plan_providers,
    system_problem,
)

log = logging.getLogger(__name__)

# Fastest first: TensorRT on Jetson, then CUDA, then the CPU that is always there.
DEFAULT_PROVIDERS = [TENSORRT, CUDA, CPU]

# Execution provider -> tolerance family (agent.runtimes.base.Runtime.family).
PROVIDER_FAMILY = {
    CPU: "cpu",
    CUDA: "cuda",
    TENSORRT: "tensorrt",
}

MB = 1024 * 1024
# TensorRT's builder workspace when neither the config nor a cap bounds it.
_TRT_DEFAULT_WORKSPACE = 1024 * MB


@dataclass(frozen=True)
class OrtConfig:
    providers: list[str] = field(default_factory=lambda: list(DEFAULT_PROVIDERS))
    # Serve on exactly `providers` or not at all: a provider that this device cannot
    # run (not in the build, libraries missing, no GPU, the session refusing it) makes
    # the model refused (and the agent not start) instead of falling back; CPU is
    # then only used when listed.
    require_providers: bool = False
    # Load CUDA/cuDNN from the nvidia-* pip packages first (onnxruntime.preload_dlls),
    # for installs that have them there rather than on the loader's path.
    preload_dlls: bool = False
    # 0 lets ONNX Runtime pick (one thread per physical core).
    intra_op_threads: int = constraint(0, ge=0, le=256)
    inter_op_threads: int = constraint(0, ge=0, le=256)
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # Idle intra-op threads spin for a while waiting for more work (ORT's default). Off
    # by default here: on a small board the spinning threads take the CPU the request
    # thread (or a camera pipeline) needs next, and they count in every request's CPU:
    # bare onnxruntime on the digits sample at batch 256 costs 1.6 ms of CPU a run
    # spinning, 1.2 ms not, for 0.1 ms less wall time (bench/peers.py, 2-vCPU VM).
    # True for the last microseconds of latency on a dedicated, mains-powered device.
    allow_spinning: bool = False
    # The arena keeps freed blocks for reuse (faster); the agent shrinks it after
    # requests far larger than usual, so a burst does not pin RSS at its peak.
    cpu_mem_arena: bool = True
    mem_pattern: bool = True
    # For the CPU arena and the CUDA provider's device arena alike.
    arena_extend_strategy: Literal["next_power_of_two", "same_as_requested"] = "next_power_of_two"
    # The GPU (CUDA device ordinal) the CUDA and TensorRT providers run on.
    device_id: int = constraint(0, ge=0, le=64)
    # Bound of the CUDA provider's device arena in MiB (0: the device memory cap the
    # agent computes: memory.gpu_max_mb, or on unified memory the memory cap).
    # A configured value above that cap is lowered to it.
    gpu_mem_limit_mb: int = constraint(0, ge=0, le=16 * 1024 * 1024)
    # cuDNN convolution algorithm search: exhaustive benchmarks every algorithm on the
    # first run of each shape (fastest kernels, slower first requests); heuristic asks
    # cuDNN's heuristics; default takes the first algorithm.
    cudnn_conv_algo_search: Literal["exhaustive", "heuristic", "default"] = "exhaustive"
    # TF32 tensor cores for FP32 MatMul/Conv on Ampere and later (onnxruntime's default):
    # faster, with a 10-bit mantissa, so FP32 outputs move by ~1e-3 relative (the golden
    # tolerance's "cuda" family allows for it). False computes in full FP32.
    cuda_tf32: bool = True
    # TensorRT may compute in FP16 / INT8 when the bundle allows it (the variant's
    # precision: the builder validated those numerics); false never.
    tensorrt_fp16: bool = True
    tensorrt_int8: bool = True
    # TensorRT builder workspace in MiB (0: 1 GiB), bounded by the device memory cap.
    tensorrt_workspace_mb: int = constraint(0, ge=0, le=1024 * 1024)
    # Keep built engines and timing caches under STATE/cache/tensorrt/<bundle sha256>:
    # a restart reuses them, a new bundle builds its own.
    tensorrt_engine_cache: bool = True


_CUDNN_SEARCH = {"exhaustive": "EXHAUSTIVE", "heuristic": "HEURISTIC", "default": "DEFAULT"}
_ARENA = {"next_power_of_two": "kNextPowerOfTwo", "same_as_requested": "kSameAsRequested"}


def device_memory_limit(cfg: OrtConfig, context: LoadContext) -> int:
    """Bytes the CUDA arena may take: the configured bound, never above the cap."""
    cap = context.device_memory_cap_bytes
    want = cfg.gpu_mem_limit_mb * MB
    if want and cap:
        return min(want, cap)
    return want or cap


def tensorrt_workspace(cfg: OrtConfig, context: LoadContext) -> int:
    want = cfg.tensorrt_workspace_mb * MB or _TRT_DEFAULT_WORKSPACE
    cap = context.device_memory_cap_bytes
    return min(want, cap) if cap else want


def engine_cache_dir(context: LoadContext) -> Path | None:
    if context.cache_dir is None or not context.bundle_sha256:
        return None
    return context.cache_dir / "tensorrt" / context.bundle_sha256


def provider_options(provider: str, cfg: OrtConfig, context: LoadContext) -> dict[str, str]:
    """onnxruntime's provider options (all strings) for one provider."""
    opts: dict[str, str] = {}
    if provider == CUDA:
        opts["device_id"] = str(cfg.device_id)
        opts["arena_extend_strategy"] = _ARENA[cfg.arena_extend_strategy]
        opts["cudnn_conv_algo_search"] = _CUDNN_SEARCH[cfg.cudnn_conv_algo_search]
        opts["use_tf32"] = "1" if cfg.cuda_tf32 else "0"
        limit = device_memory_limit(cfg, context)
        if limit:
            opts["gpu_mem_limit"] = str(limit)
    elif provider == TENSORRT:
        opts["device_id"] = str(cfg.device_id)
        opts["trt_max_workspace_size"] = str(tensorrt_workspace(cfg, context))
        fp16 = cfg.tensorrt_fp16 and "fp16" in context.precisions
        int8 = cfg.tensorrt_int8 and "int8" in context.precisions
        opts["trt_fp16_enable"] = "1" if fp16 else "0"
        opts["trt_int8_enable"] = "1" if int8 else "0"
        cache = engine_cache_dir(context) if cfg.tensorrt_engine_cache else None
        if cache is not None:
            opts["trt_engine_cache_enable"] = "1"
            opts["trt_engine_cache_path"] = str(cache)
            opts["trt_timing_cache_enable"] = "1"
            opts["trt_timing_cache_path"] = str(cache)
    return opts


def _cache_files(directory: Path | None) -> set[str]:
    if directory is None:
        return set()
    try:
        return {p.name for p in directory.iterdir() if p.is_file()}
    except OSError:
        return set()


_PRELOADED: set[str] = set()


def _preload_dlls(ort: Any) -> None:
    """onnxruntime.preload_dlls, once, where the build has it (it prints on stdout:
    captured into the log, as stdout may be the agent's own output)."""
    if _PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED.add("done")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            ort.preload_dlls()
    except OSError as exc:
        log.warning("onnxruntime.preload_dlls failed: %s", exc)
    if out.getvalue().strip():
        log.info("onnxruntime.preload_dlls: %s", out.getvalue().strip())


@register
class OrtRuntime(Runtime):
    name: ClassVar[str] = "onnxruntime"
    format: ClassVar[str] = "onnx"
    platform: ClassVar[str] = "onnxruntime_onnx"
    config_type: ClassVar[type[Any]] = OrtConfig
    tunable: ClassVar[tuple[str, ...]] = ("intra_op_threads",)
    readable: ClassVar[tuple[str, ...]] = (
        "providers",
        "require_providers",
        "inter_op_threads",
        "execution_mode",
        "graph_optimization",
        "allow_spinning",
        "cpu_mem_arena",
        "device_id",
        "gpu_mem_limit_mb",
        "cudnn_conv_algo_search",
        "cuda_tf32",
        "tensorrt_fp16",
        "tensorrt_int8",
    )
    threads_field: ClassVar[str | None] = "intra_op_threads"

    @classmethod
    def open(
        cls,
        model_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        config: Any,
        context: LoadContext,
    ) -> Runtime:
        return cls(model_path, inputs, outputs, config, context)

    def __init__(
        self,
        model_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        config: OrtConfig | None = None,
        context: LoadContext | None = None,
    ) -> None:
        super().__init__(model_path, inputs, outputs)
        import onnxruntime as ort

        cfg = config or OrtConfig()
        ctx = context or LoadContext()
        self.config = cfg
        self.context = ctx
        self._notices: list[Notice] = []
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
        # Set both ways: "1" is ORT's default, written so status shows what runs.
        spin = "1" if cfg.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if cfg.cpu_mem_arena and cfg.arena_extend_strategy == "same_as_requested":
            # Growing the arena by exactly what is asked keeps RSS close to the need,
            # at some speed cost; ORT only offers it through a shared env allocator.
            _register_same_as_requested_cpu_arena(ort)
            options.add_session_config_entry("session.use_env_allocators", "1")
        if cfg.preload_dlls:
            _preload_dlls(ort)
        self.plan = plan_for(cfg, ort.get_available_providers())
        cache = engine_cache_dir(ctx) if TENSORRT in self.plan.asked else None
        if cache is not None and cfg.tensorrt_engine_cache:
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("TensorRT engine cache %s cannot be made: %s", cache, exc)
        self._cache = cache if cfg.tensorrt_engine_cache else None
        self._cache_before = _cache_files(self._cache)
        t0 = time.perf_counter()
        self.session = self._open_session(ort, model_path, options)
        self.session_s = time.perf_counter() - t0
        self._first_run_s: float | None = None
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
        dropped = fallbacks(self._asked, self._providers)
        if dropped and cfg.require_providers:
            raise RuntimeUnavailableError(
                f"runtimes.onnxruntime.require_providers: onnxruntime did not take "
                f"{', '.join(dropped)} for {model_path.name} (it serves on "
                f"{', '.join(self._providers)})"
            )
        if dropped:
            # onnxruntime dropped a provider without failing (it only warns): what
            # ultralytics#19159 saw, a GPU build silently serving on the CPU.
            self._fallback(dropped[0], "onnxruntime did not take it", self._providers)
        # Shrinking returns the arena's unused extensions at the end of a run: kept
        # for big requests only, as re-growing it costs small ones their speed.
        self._release = ort.RunOptions()
        if cfg.cpu_mem_arena:
            self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        log.info("onnxruntime session for %s on %s", model_path.name, self._providers)

    def _open_session(self, ort: Any, model_path: Path, options: Any) -> Any:
        """Open with the planned providers; when one fails to initialise, log it and
        try again without it (unless providers are required)."""
        asked = list(self.plan.asked)
        while True:
            self._asked = list(asked)
            try:
                # enable_fallback=0: onnxruntime's own fallback prints on stdout and
                # would, at run time, move a validated model to another provider.
                return ort.InferenceSession(
                    str(model_path),
                    sess_options=options,
                    providers=asked,
                    provider_options=[
                        provider_options(p, self.config, self.context) for p in asked
                    ],
                    enable_fallback=0,
                )
            except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph
                first = first_line(exc)
                if len(asked) == 1 or asked[0] == CPU:
                    if self.config.require_providers and asked[0] != CPU:
                        raise RuntimeUnavailableError(
                            f"runtimes.onnxruntime.require_providers: {asked[0]} does not "
                            f"open {model_path.name} here: {first}"
                        ) from exc
                    raise ModelLoadError(f"onnxruntime refused {model_path.name}: {first}") from exc
                if self.config.require_providers:
                    raise RuntimeUnavailableError(
                        f"runtimes.onnxruntime.require_providers: {asked[0]} does not open "
                        f"{model_path.name} here: {first}"
                    ) from exc
                self._fallback(asked[0], first, asked[1:])
                asked = asked[1:]

    def _fallback(self, provider: str, why: str, now: list[str]) -> None:
        log.warning(
            "onnxruntime: %s failed for %s (%s); falling back to %s",
            provider,
            self.model_path.name,
            why,
            ", ".join(now),
        )
        self._notices.append(
            Notice(
                "provider_fallback",
                f"{provider} failed ({why}); serving on {', '.join(now)}",
                {"provider": provider, "reason": why, "providers": list(now)},
            )
        )

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
        first = self._first_run_s is None
        t0 = time.perf_counter() if first else 0.0
        try:
            results = self.session.run(self._output_names, feeds)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        if first:
            # TensorRT builds engines for dynamic shapes on the first run, not at open.
            self._first_run_s = time.perf_counter() - t0
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

    def providers(self) -> list[str]:
        return list(self._providers)

    def notices(self) -> list[Notice]:
        out = list(self._notices)
        self._notices.clear()
        if self._cache is not None:
            built = sorted(_cache_files(self._cache) - self._cache_before)
            self._cache_before |= set(built)
            engines = [n for n in built if n.endswith(".engine")]
            if engines:
                out.append(
                    Notice(
                        "engine_built",
                        f"TensorRT built {len(engines)} engine(s) for {self.model_path.name} "
                        f"in {self.session_s + (self._first_run_s or 0.0):.1f} s "
                        f"(cached in {self._cache})",
                        {
                            "engines": engines,
                            "session_s": round(self.session_s, 3),
                            "first_run_s": round(self._first_run_s or 0.0, 3),
                            "cache": str(self._cache),
                        },
                    )
                )
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "providers": list(self._providers),
            "providers_asked": list(self.plan.asked),
            "providers_skipped": dict(self.plan.skipped),
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


_LOGGED_SKIPS: set[tuple[str, str]] = set()


def plan_for(cfg: OrtConfig, available: list[str]) -> ProviderPlan:
    """The providers to ask for under `cfg` on this machine; each skipped one is
    logged with why. With `require_providers`, any skipped one refuses the load."""
    plan = plan_providers(
        cfg.providers,
        available,
        system_problem(capi_directory()),
        cpu_fallback=not cfg.require_providers,
    )
    for provider, why in plan.skipped.items():
        # Once per process and reason: every reopen would repeat it otherwise.
        if (provider, why) not in _LOGGED_SKIPS:
            _LOGGED_SKIPS.add((provider, why))
            log.info("execution provider %s skipped: %s", provider, why)
    if cfg.require_providers and plan.skipped:
        provider, why = next(iter(plan.skipped.items()))
        raise RuntimeUnavailableError(
            f"runtimes.onnxruntime.require_providers: {provider} cannot run here: {why}"
        )
    if not plan.asked:
        raise RuntimeUnavailableError("runtimes.onnxruntime.providers lists no provider")
    return plan
