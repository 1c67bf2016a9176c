"""The build recipe: a TOML file validated into frozen dataclasses.

Validation reuses the agent's typed loader, so the rules are the same as for the
agent's config: unknown keys are rejected, and every problem names its dotted key
path, the bad value and what is allowed. Cross-field rules (an embedding task
with a KD loss, a bring-your-own ONNX recipe that asks for pruning...) are
checked afterwards with the same kind of message.
"""

from __future__ import annotations

import builtins
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.config.typed import ConfigError, ConfigIssue, build, constraint
from export.pipeline.errors import RecipeError

Task = Literal["classification", "embedding"]
DType = Literal["float32", "float16", "int64", "int32", "uint8", "int8", "bool"]
# "auto" follows the build host's CPU (export.pipeline.isa); the others name a target.
# "avx512_vnni" and "jetson-tensorrt" are the older names of x86_64-vnni and jetson-orin.
Preset = Literal["auto", "none", "x86_64-vnni", "x86_64-avx2", "arm64", "arm64-dotprod",
                 "jetson-orin", "avx512_vnni", "jetson-tensorrt"]  # fmt: skip
QuantMode = Literal["static", "dynamic", "qat"]
CalibrationMethod = Literal["minmax", "entropy", "percentile", "distribution"]
_BUILDER = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"


@dataclass(frozen=True)
class TensorDecl:
    name: str = constraint(pattern=r"[A-Za-z_][\w.:/-]*")
    dtype: DType = "float32"
    # -1 marks a dynamic axis; axis 0 is the batch and must be -1.
    shape: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ModelSource:
    builder: str = constraint(pattern=_BUILDER, help="module:function returning an nn.Module")
    checkpoint: str | None = None  # a state_dict file, relative to the recipe


@dataclass(frozen=True)
class OnnxSource:
    path: str  # an existing float ONNX model, relative to the recipe


@dataclass(frozen=True)
class DatasetSpec:
    builder: str = constraint(pattern=_BUILDER, help="module:function returning the splits")
    batch_size: int = constraint(64, ge=1, le=65536)
    # Rows of the calibration split used for INT8 calibration (0 = all of it).
    calibration_samples: int = constraint(256, ge=0, le=1_000_000)


@dataclass(frozen=True)
class DistillSpec:
    enabled: bool = True
    epochs: int = constraint(10, ge=1, le=10_000)
    lr: float = constraint(1e-3, ge=1e-8, le=10.0)
    temperature: float = constraint(4.0, ge=0.05, le=100.0)
    # Weight of the soft (teacher) term; 1 - alpha goes to the hard labels.
    alpha: float = constraint(0.7, ge=0.0, le=1.0)
    loss: Literal["kd", "cosine", "mse"] = "kd"
    weight_decay: float = constraint(0.0, ge=0.0, le=1.0)


@dataclass(frozen=True)
class PruneSpec:
    enabled: bool = False
    method: Literal["structured", "magnitude"] = "structured"
    # Fraction of channels (structured) or weights (magnitude) removed.
    ratio: float = constraint(0.3, ge=0.0, le=0.95)
    # Layers never pruned (module names); the output layer is always kept.
    ignore: list[str] = field(default_factory=list)
    finetune_epochs: int = constraint(5, ge=0, le=10_000)
    finetune_lr: float = constraint(5e-4, ge=1e-8, le=10.0)


@dataclass(frozen=True)
class OnnxSpec:
    opset: int = constraint(17, ge=13, le=23)
    # Parity of the exported float model against PyTorch on held-out inputs.
    atol: float = constraint(1e-4, ge=0.0, le=10.0)
    parity_samples: int = constraint(64, ge=1, le=100_000)


@dataclass(frozen=True)
class QuantizeSpec:
    enabled: bool = True
    # "optimum" runs Optimum's ORTQuantizer (transformers); "onnxruntime" the plain API.
    engine: Literal["onnxruntime", "optimum"] = "onnxruntime"
    # static: calibrated QDQ; dynamic: weights only; qat: fake-quant fine-tuning in torch,
    # exported as QDQ with the ranges it learned (export.pipeline.qat).
    mode: QuantMode = "static"
    # More INT8 variants built beside `mode` (each its own candidate and bundle variant);
    # one that fails its gate is left out with a note instead of failing the build.
    extra_modes: list[QuantMode] = field(default_factory=list)
    preset: Preset = "none"
    calibration_method: CalibrationMethod = "minmax"
    per_channel: bool | None = None  # None: what the preset says
    # Operator types to quantize; empty: the engine's default set.
    operators: list[str] = field(default_factory=list)
    # Accuracy-driven mixed precision: when static INT8 breaks the gate, keep the layers
    # most sensitive to quantization in float (one-layer-at-a-time error against the float
    # model), most sensitive first, until the gate passes or `mixed_max_float` of the
    # quantizable nodes are float (beyond that the INT8 speed gain is gone).
    mixed_precision: bool = False
    mixed_max_float: builtins.float = constraint(0.5, ge=0.0, le=1.0)  # noqa: RUF009
    # QAT fine-tuning (mode or extra_modes "qat"): epochs and learning rate, distilled
    # from the teacher like the prune fine-tune.
    qat_epochs: int = constraint(3, ge=1, le=10_000)
    qat_lr: builtins.float = constraint(5e-4, ge=1e-8, le=10.0)  # noqa: RUF009
    # Initial activation ranges of QAT: this percentile of each tensor on the calibration
    # rows (then learned); below 100 clips rare outliers that minmax PTQ must cover.
    qat_percentile: builtins.float = constraint(99.99, ge=50.0, le=100.0)  # noqa: RUF009


@dataclass(frozen=True)
class TfliteSpec:
    enabled: bool = True
    float: bool = True
    int8: bool = True
    # litert-torch freezes the batch axis; the agent runs larger requests in slices.
    batch: int = constraint(1, ge=1, le=4096)
    per_channel: bool = True
    # Agreement with the reference (PyTorch model) on eval inputs.
    float_atol: builtins.float = constraint(1e-3, ge=0.0, le=10.0)  # noqa: RUF009


@dataclass(frozen=True)
class GateSpec:
    # Classification: top-1 accuracy may fall at most this many points below the
    # teacher at any stage (distill, prune, each exported format).
    max_accuracy_drop: float = constraint(1.0, ge=0.0, le=100.0)
    # Embedding: mean cosine similarity to the teacher must stay at least this.
    min_cosine: float = constraint(0.99, ge=-1.0, le=1.0)


@dataclass(frozen=True)
class SelectSpec:
    prefer: Literal["fastest", "int8", "float"] = "fastest"
    # "all": the bundle carries every candidate whose gates passed as a variant (the
    # device picks by measuring); "selected": only what `prefer` chose per format.
    bundle: Literal["all", "selected"] = "all"
    threads: int = constraint(1, ge=1, le=64)
    runs: int = constraint(30, ge=3, le=100_000)


@dataclass(frozen=True)
class Recipe:
    name: str  # 1-64 of A-Za-z0-9._- (checked in _cross_checks)
    version: str  # MAJOR.MINOR.PATCH
    task: Task
    dataset: DatasetSpec
    inputs: list[TensorDecl]
    outputs: list[str]
    teacher: ModelSource | None = None
    student: ModelSource | None = None
    onnx_model: OnnxSource | None = None
    labels: list[str] = field(default_factory=list)
    seed: int = constraint(0, ge=0)
    # Threads for torch work (training, evaluation). 1 by default: small models gain
    # nothing from more, and OpenMP spin-waiting on a busy 2-core machine can make
    # training ten times slower. 0 = torch's own default.
    torch_threads: int = constraint(1, ge=0, le=256)
    distill: DistillSpec = field(default_factory=DistillSpec)
    prune: PruneSpec = field(default_factory=PruneSpec)
    onnx: OnnxSpec = field(default_factory=OnnxSpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    tflite: TfliteSpec = field(default_factory=TfliteSpec)
    gates: GateSpec = field(default_factory=GateSpec)
    select: SelectSpec = field(default_factory=SelectSpec)
    # Set by load_recipe: the folder relative paths and modules resolve from.
    base_dir: str = ""

    @property
    def root(self) -> Path:
        return Path(self.base_dir)

    @property
    def byo(self) -> bool:
        """Bring-your-own ONNX: no torch model, so only quantize, gates and package."""
        return self.onnx_model is not None

    @property
    def distill_on(self) -> bool:
        return not self.byo and self.student is not None and self.distill.enabled

    @property
    def prune_on(self) -> bool:
        return not self.byo and self.prune.enabled

    @property
    def tflite_on(self) -> bool:
        return not self.byo and self.tflite.enabled and (self.tflite.float or self.tflite.int8)


def _cross_checks(r: Recipe) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def fail(path: str, message: str) -> None:
        issues.append(ConfigIssue(path, message))

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", r.name):
        fail("name", f"{r.name!r} must be 1-64 of A-Za-z0-9._-")
    if not re.fullmatch(r"\d+\.\d+\.\d+", r.version):
        fail("version", f"{r.version!r} must be MAJOR.MINOR.PATCH, e.g. '1.0.0'")
    if (r.teacher is None) == (r.onnx_model is None):
        fail("teacher", "give exactly one of [teacher] (a PyTorch builder) or [onnx_model]")
    if r.byo:
        if r.student is not None:
            fail("student", "a bring-your-own ONNX recipe has no torch model to distill into")
        if r.prune.enabled:
            fail("prune.enabled", "true is not allowed with [onnx_model]; allowed: false")
        if r.tflite.enabled:
            fail("tflite.enabled", "true is not allowed with [onnx_model]; allowed: false")
    if not r.inputs:
        fail("inputs", "list at least one input tensor")
    if not r.outputs:
        fail("outputs", "list at least one output name")
    names = [t.name for t in r.inputs] + list(r.outputs)
    if len(set(names)) != len(names):
        fail("inputs", f"tensor names must be unique, got {names}")
    for i, t in enumerate(r.inputs):
        if not t.shape or t.shape[0] != -1:
            fail(f"inputs[{i}].shape", f"{t.shape} must start with -1 (the batch axis)")
        if any(d == 0 or d < -1 for d in t.shape):
            fail(f"inputs[{i}].shape", f"{t.shape}: dimensions are positive or -1")
    if r.distill_on:
        allowed = ("kd",) if r.task == "classification" else ("cosine", "mse")
        if r.distill.loss not in allowed:
            fail(
                "distill.loss",
                f"{r.distill.loss!r} is not allowed for task {r.task!r}; choose one of "
                + ", ".join(repr(a) for a in allowed),
            )
    if r.task == "classification" and len(r.outputs) != 1:
        fail("outputs", f"a classification model has one output (logits), got {r.outputs}")
    if r.task == "embedding" and r.labels:
        fail("labels", "an embedding model has no labels")
    q = r.quantize
    modes = [q.mode, *q.extra_modes]
    if q.enabled and q.preset in ("jetson-orin", "jetson-tensorrt") and "dynamic" in modes:
        fail("quantize.mode", f"'dynamic' is not allowed with preset {q.preset!r}; "
             "allowed: 'static', 'qat' (TensorRT only consumes QDQ graphs)")  # fmt: skip
    if len(set(modes)) != len(modes):
        fail("quantize.extra_modes", f"{q.extra_modes} repeats a mode (mode = {q.mode!r}); "
             "list each INT8 method once")  # fmt: skip
    if q.enabled and "qat" in modes and r.byo:
        fail("quantize.mode", "'qat' needs a torch model to fine-tune; [onnx_model] has none; "
             "allowed: 'static', 'dynamic'")  # fmt: skip
    if q.enabled and "qat" in modes and q.engine == "optimum":
        fail("quantize.engine", "'optimum' is not allowed with 'qat' (QAT exports its own QDQ "
             "graph); allowed: 'onnxruntime'")  # fmt: skip
    if q.mixed_precision and "static" not in modes:
        fail("quantize.mixed_precision", "true needs a static INT8 model to start from; "
             f"modes are {modes}; add 'static'")  # fmt: skip
    if (
        q.enabled
        and q.engine == "optimum"
        and q.mode == "static"
        and q.calibration_method == ("distribution")
    ):
        fail("quantize.calibration_method", "'distribution' is not offered by Optimum; "
             "choose one of 'minmax', 'entropy', 'percentile'")  # fmt: skip
    if r.tflite_on and r.tflite.int8 and r.dataset.calibration_samples == 0:
        pass  # 0 means "all of the split"; emptiness is checked against the data
    return issues


def parse_recipe(data: dict[str, Any], base_dir: Path, source: str = "recipe") -> Recipe:
    """Validate a decoded recipe; raise RecipeError listing every problem."""
    data = dict(data)
    if "base_dir" in data:
        raise RecipeError(f"{source} has 1 problem(s):\n  base_dir: unknown key")
    data["base_dir"] = str(base_dir)
    try:
        recipe = build(Recipe, data, source)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from exc
    issues = _cross_checks(recipe)
    if issues:
        raise RecipeError(str(ConfigError(issues, source)))
    return recipe


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML: {exc}") from exc
    return parse_recipe(data, path.resolve().parent, source=str(path))


def split_builder(spec: str) -> tuple[str, str]:
    module, _, func = spec.partition(":")
    if not re.fullmatch(_BUILDER, spec):  # pragma: no cover - validated on load
        raise RecipeError(f"{spec!r} is not module:function")
    return module, func
