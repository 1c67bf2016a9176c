"""Write the golden tolerance rule a bundle carries: derived from the model, then measured.

The device judges its golden replay with `agent.tolerance.compare` and the rule
for its runtime's family (docs/DESIGN.md, "Golden tolerance"). The builder writes
that rule, per output and per family, from two things it can know here:

- what the model is: an output behind a DequantizeLinear (ONNX) or an int8 tensor
  (TFLite) moves in whole steps of its scale, read from the file (`quant_steps`);
- how far the same model lands when computed the other ways the families compute
  it, measured with real onnxruntime/LiteRT sessions on the golden inputs
  (`replays`): "cpu" unfused (graph optimizations off: QDQ as float, as a CPU
  without the fused integer kernels runs it) or LiteRT's reference kernels;
  "cuda" with the operands of every Conv/Gemm/MatMul rounded to a 10-bit mantissa
  (TF32, which the CUDA provider uses for float convolutions and products) and QDQ
  unfused (the CUDA provider has no fused integer kernels either); "tensorrt" with
  every float tensor rounded to FP16 as well.

Each bound is the larger of a floor from first principles and MARGIN times what
was measured, capped by what the rule may allow (agent.tolerance). Then the rule
is checked against the same replays with the device's own `compare`: a rule that
refuses a correct model computed another way is never written.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import TensorSpec
from agent.runtimes.base import Feeds
from agent.tolerance import (
    ALLOWANCE_FLOOR,
    ALLOWANCE_SHARE,
    EPS_10BIT,
    MAX_NORM_RTOL,
    MAX_RANGE_SHARE,
    MAX_STEPS,
    Bound,
    OutputRule,
    Tolerance,
    ToleranceReport,
    compare,
)

log = logging.getLogger(__name__)

FAMILIES = ("cpu", "cuda", "tensorrt")
MARGIN = 4.0  # times the largest difference measured on the golden cases
# Two float32 CPU runs differ by rounding: 256 ulps of the output's magnitude covers
# a model a few dozen layers deep with wide sums, four orders below a wrong weight.
CPU_ULPS = 256
EPS32 = float(np.finfo(np.float32).eps)
# Floors for what the replays here cannot show: other CPUs' integer kernels round a
# requantization differently (a step or two), a GPU picks its own kernels (Winograd,
# split-K) and TensorRT fuses layers. In 10-bit ulps of the output's range, or steps.
RANGE_FLOORS = {"cuda": 1 * EPS_10BIT, "tensorrt": 2 * EPS_10BIT}
STEP_FLOORS = {"cpu": 2.0, "cuda": 2.0, "tensorrt": 4.0}
# The same, as a case's relative L2 error (outputs judged so: DESIGN.md).
NORM_FLOORS = {"cpu": CPU_ULPS * EPS32, "cuda": 2 * EPS_10BIT, "tensorrt": 4 * EPS_10BIT}
_MATMUL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that pass a tensor's values through unchanged, between an output and its
# DequantizeLinear.
_PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose")


@dataclass(frozen=True)
class Replay:
    """The golden inputs run another way a family computes the model."""

    family: str
    how: str
    outputs: dict[str, np.ndarray]
    # Outputs that came out non-finite with every tensor rounded to FP16: the model's
    # activations overflow FP16 (max 65504), so TensorRT must not compute it in FP16.
    fp16_overflow: tuple[str, ...] = ()


# --------------------------------------------------------------------------- the model


def onnx_quant_steps(path: Path) -> dict[str, float]:
    """Output name -> the scale of the DequantizeLinear that makes it (per-tensor or the
    largest per-channel scale), for outputs that come out of one."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    consts = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = node.attribute[0].t
    steps: dict[str, float] = {}
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in consts:
            continue
        scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float64)
        if scale.size and np.isfinite(scale).all() and float(scale.max()) > 0:
            steps[output.name] = float(scale.max())
    return steps


def tflite_quant_steps(path: Path, names: Iterable[str]) -> dict[str, float]:
    """Output name (in `names`' order: TFLite renames tensors) -> its int8 scale."""
    from agent.runtimes.litert import _interpreter_class

    interpreter_cls, _ = _interpreter_class()
    interp = interpreter_cls(model_path=str(path))
    steps: dict[str, float] = {}
    for name, detail in zip(names, interp.get_output_details(), strict=False):
        scale = float(detail.get("quantization", (0.0, 0))[0])
        if np.dtype(detail["dtype"]).kind in "iu" and math.isfinite(scale) and scale > 0:
            steps[name] = scale
    return steps


# --------------------------------------------------------------------------- replays


# Veltkamp's split: c = x * (2^13 + 1); x - (c - x) ... keeps x's top 24 - 13 = 11
# significant bits (TF32's 10-bit mantissa), rounded to nearest, in float32's range.
_SPLIT = float(2**13 + 1)


def tf32_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32's 10-bit mantissa, exponent range kept."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        c = x * np.float32(_SPLIT)
        out = c - (c - x)
    # Past float32's max / 8193 the split overflows; such values are left as they are.
    return np.where(np.isfinite(out), out, x).astype(np.float32)


def reduced_precision(model: Any, everywhere: bool) -> Any:
    """A copy of the ONNX model that computes as TF32 (everywhere=False) or FP16 does:
    the float operands of every Conv/Gemm/MatMul rounded to a 10-bit mantissa (a Cast
    to float16 and back with `everywhere`, else Veltkamp's split that keeps float32's
    exponent as TF32 does: the products then accumulate in float32, as tensor cores
    do), and with `everywhere` every float tensor a node makes rounded to FP16 as well."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    inferred = onnx.shape_inference.infer_shapes(m).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.value_info, *inferred.input, *inferred.output]
    }
    inits = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    count = 0
    split = "__tf32_split"
    graph.initializer.append(numpy_helper.from_array(np.array(_SPLIT, np.float32), split))

    def pair(src: str, dst: str) -> None:
        nonlocal count
        count += 1
        half = f"{dst}__fp16_{count}"
        nodes.append(helper.make_node("Cast", [src], [half], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", [half], [dst], to=TensorProto.FLOAT))

    def tf32(src: str, dst: str) -> None:
        # Veltkamp's split in float32 (tf32_round): TF32 keeps float32's exponent,
        # so a Cast through float16 would overflow values TF32 holds.
        nonlocal count
        count += 1
        c, d = f"{dst}__c_{count}", f"{dst}__d_{count}"
        nodes.append(helper.make_node("Mul", [src, split], [c]))
        nodes.append(helper.make_node("Sub", [c, src], [d]))
        nodes.append(helper.make_node("Sub", [c, d], [dst]))

    round_operand = pair if everywhere else tf32

    for node in graph.node:
        if node.op_type in _MATMUL_OPS:
            for index in (0, 1):
                name = node.input[index]
                if name in inits:
                    tensor = inits[name]
                    if tensor.data_type == TensorProto.FLOAT:
                        w = numpy_helper.to_array(tensor)
                        rounded = w.astype(np.float16).astype(np.float32) if everywhere \
                            else tf32_round(w)  # fmt: skip
                        tensor.CopyFrom(numpy_helper.from_array(rounded, name))
                elif types.get(name) == TensorProto.FLOAT:
                    node.input[index] = f"{name}__r10_{count + 1}"
                    round_operand(name, node.input[index])
        nodes.append(node)
        if everywhere and node.op_type not in ("Cast", "Constant"):
            for index, name in enumerate(node.output):
                if types.get(name) == TensorProto.FLOAT:
                    # What the next node (or the caller) reads is FP16, outputs included:
                    # an FP16 engine's last layer computes its output in FP16 too.
                    node.output[index] = f"{name}__fp32_{count + 1}"
                    pair(node.output[index], name)
    del graph.node[:]
    graph.node.extend(nodes)
    return m


Specs = tuple[TensorSpec, ...]


def _ort_run(path: Path, specs: tuple[Specs, Specs], inputs: Mapping[str, np.ndarray]) -> Feeds:
    """The agent's own onnxruntime runtime on the CPU, graph optimizations off."""
    from agent.runtimes.ort import OrtConfig, OrtRuntime

    config = OrtConfig(
        providers=["CPUExecutionProvider"], intra_op_threads=1, graph_optimization="disable"
    )
    runtime = OrtRuntime(path, specs[0], specs[1], config)
    try:
        return runtime.run(dict(inputs))
    finally:
        runtime.close()


def onnx_replays(
    path: Path, specs: tuple[Specs, Specs], inputs: Mapping[str, np.ndarray]
) -> list[Replay]:
    """The golden inputs through the model as each family computes it (module doc)."""
    import onnx

    model = onnx.load(str(path))
    replays = [Replay("cpu", "onnxruntime CPU, graph optimizations off (QDQ unfused, as float)",
                      _ort_run(path, specs, inputs))]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgerun-rule-") as tmp:
        for family, everywhere, how in (
            ("cuda", False, "operands of Conv/Gemm/MatMul rounded to TF32's 10-bit mantissa, "
                            "QDQ unfused"),
            ("tensorrt", True, "every float tensor rounded to FP16, QDQ unfused"),
        ):  # fmt: skip
            sim = Path(tmp) / f"{family}.onnx"
            onnx.save(reduced_precision(model, everywhere), str(sim))
            got = _ort_run(sim, specs, inputs)
            over = _overflowed(got, replays[0].outputs) if everywhere else ()
            said = how
            if over:
                # Not a tolerance question: FP16 cannot hold these activations. The
                # bundle says so (the agent then never enables TensorRT's FP16) and
                # TensorRT's rule is derived from how it computes without FP16: TF32.
                log.warning(
                    "golden rule: %s overflow FP16 (non-finite with every tensor rounded to "
                    "FP16); TensorRT must not compute this model in FP16", ", ".join(over),
                )  # fmt: skip
                said = (f"FP16 overflows ({', '.join(over)} non-finite with every tensor "
                       "rounded to FP16): FP16 not allowed; judged as TensorRT computes "
                       "without it, operands rounded to TF32, QDQ unfused")  # fmt: skip
                got = replays[1].outputs
            replays.append(Replay(family, said if over else how, got, fp16_overflow=over))
    return replays


def _overflowed(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """Outputs non-finite in `got` where the float model's own run is finite."""
    return tuple(
        sorted(
            name
            for name, have in got.items()
            if name in ref
            and np.isfinite(np.asarray(ref[name], np.float64)).all()
            and not np.isfinite(np.asarray(have, np.float64)).all()
        )
    )


def fp16_overflow(replays: Iterable[Replay]) -> tuple[str, ...]:
    """The outputs whose FP16 replay overflowed (empty: FP16 is allowed)."""
    return tuple(sorted({name for r in replays for name in r.fp16_overflow}))


def tflite_replays(
    path: Path, specs: tuple[Specs, Specs], inputs: Mapping[str, np.ndarray]
) -> list[Replay]:
    """LiteRT's builtin kernels without XNNPACK: another CPU's arithmetic on the model."""
    from agent.runtimes.litert import LiteRTConfig, LiteRTRuntime

    runtime = LiteRTRuntime(path, specs[0], specs[1], LiteRTConfig(xnnpack=False))
    try:
        got = runtime.run(dict(inputs))
    finally:
        runtime.close()
    return [Replay("cpu", "LiteRT builtin kernels without XNNPACK", got)]


# --------------------------------------------------------------------------- the rule


def _cap(value: float, peak: float) -> float:
    """The most an absolute allowance may be for an output of this peak magnitude."""
    return min(value, max(ALLOWANCE_FLOOR, ALLOWANCE_SHARE * peak))


def _worst(replays: Iterable[Replay], family: str, name: str, want: np.ndarray) -> float:
    worst = 0.0
    for replay in replays:
        have = replay.outputs.get(name)
        if replay.family != family or have is None or np.shape(have) != want.shape:
            continue
        diff = np.abs(np.asarray(have, np.float64) - want)
        if not np.isfinite(diff).all():
            log.warning("%s: %s gave non-finite %s; its floor stands", family, replay.how, name)
            continue
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def _worst_norm(replays: Iterable[Replay], family: str, name: str, want: np.ndarray) -> float:
    from agent.tolerance import norm_errors

    worst = 0.0
    for replay in replays:
        have = replay.outputs.get(name)
        if replay.family != family or have is None or np.shape(have) != want.shape:
            continue
        errors = norm_errors(want, np.asarray(have, np.float64))
        if errors.size and np.isfinite(errors).all():
            worst = max(worst, float(errors.max()))
    return worst


def derive_tolerance(
    references: Mapping[str, Mapping[str, np.ndarray]],
    steps: Mapping[str, Mapping[str, float]],
    replays: Mapping[str, list[Replay]],
    classes: Iterable[str] = (),
    atol: float | None = None,
    rtol: float | None = None,
) -> Tolerance:
    """The rule for a bundle: `references` are the golden outputs by format, `steps` the
    outputs' quantization steps by format, `replays` the measured other ways by
    format, `classes` the outputs whose arg-max is the answer. `atol`/`rtol` given by
    a person replace the derived CPU bound of every output.

    With several formats each gets its own rule (`formats`: an INT8 ONNX moves in
    steps, a float TFLite beside it by rounding) and the top-level rule is the widest
    of them, for agents that read only that."""
    classes = list(classes)
    merged = _derive(references, steps, replays, classes, atol, rtol)
    if len(references) < 2:
        return merged
    return replace(
        merged,
        formats={
            fmt: _derive({fmt: refs}, steps, replays, classes, atol, rtol)
            for fmt, refs in references.items()
        },
    )


def _derive(
    references: Mapping[str, Mapping[str, np.ndarray]],
    steps: Mapping[str, Mapping[str, float]],
    replays: Mapping[str, list[Replay]],
    classes: list[str],
    atol: float | None,
    rtol: float | None,
) -> Tolerance:
    names = sorted({n for outs in references.values() for n in outs})
    rules: dict[str, OutputRule] = {}
    top_atol = 0.0
    for name in names:
        per_format = [(fmt, np.asarray(outs[name], np.float64)) for fmt, outs in
                      references.items() if name in outs]  # fmt: skip
        peak = max(float(np.max(np.abs(w))) if w.size else 0.0 for _, w in per_format)
        span = max(float(np.max(w) - np.min(w)) if w.size else 0.0 for _, w in per_format)
        step = max((steps.get(fmt, {}).get(name, 0.0) for fmt, _ in per_format), default=0.0)
        measured = {
            family: max(_worst(replays.get(fmt, []), family, name, w) for fmt, w in per_format)
            for family in FAMILIES
        }
        cpu_atol = _cap(max(CPU_ULPS * EPS32 * peak, MARGIN * measured["cpu"]), peak)
        if atol is not None:
            cpu_atol = atol
        families: dict[str, Bound] = {}
        if step > 0:
            cpu_steps = _steps(max(STEP_FLOORS["cpu"], MARGIN * measured["cpu"] / step), step,
                               peak)  # fmt: skip
            base = Bound(atol=cpu_atol, rtol=0.0 if rtol is None else rtol, max_steps=cpu_steps)
            for family in ("cuda", "tensorrt"):
                need = max(STEP_FLOORS[family], MARGIN * measured[family] / step)
                families[family] = Bound(max_steps=_steps(need, step, peak))
            top_atol = max(top_atol, cpu_atol, (cpu_steps + 0.5) * step)
        elif _too_noisy(measured, peak, span) and atol is None:
            # Correct runs already move some values by more than an elementwise bound may
            # allow (10% of the peak): judge each case's relative L2 error instead.
            norms = {f: max(_worst_norm(replays.get(fmt, []), f, name, w)
                            for fmt, w in per_format) for f in FAMILIES}  # fmt: skip
            base = Bound(atol=cpu_atol, rtol=0.0 if rtol is None else rtol,
                         norm_rtol=_norm_bound("cpu", norms["cpu"]))  # fmt: skip
            for family in ("cuda", "tensorrt"):
                families[family] = Bound(norm_rtol=_norm_bound(family, norms[family]))
            top_atol = max(top_atol, cpu_atol)
            log.warning(
                "golden rule: %s moves by up to %.3g on correct runs (%.0f%% of its peak "
                "%.3g), more than an elementwise bound may allow; judged by each case's "
                "relative L2 error instead (cpu %.3g, cuda %.3g, tensorrt %.3g)",
                name, max(measured.values()), 100 * max(measured.values()) / peak, peak,
                norms["cpu"], norms["cuda"], norms["tensorrt"],
            )  # fmt: skip
        else:
            base = Bound(atol=cpu_atol, rtol=0.0 if rtol is None else rtol)
            for family in ("cuda", "tensorrt"):
                share = max(RANGE_FLOORS[family], MARGIN * measured[family] / span if span else 0)
                cap = _cap(share * span, peak) / span if span else share
                families[family] = Bound(range_share=round(min(share, cap, MAX_RANGE_SHARE), 9))
            top_atol = max(top_atol, cpu_atol)
        rules[name] = OutputRule(quant_step=step or None, bound=base, families=families)
    return Tolerance(
        # What an agent that reads only atol/rtol (before per-output rules) applies: the
        # widest CPU bound of any output, so it still accepts the bundle on its CPU.
        atol=top_atol if atol is None else atol,
        rtol=0.0 if rtol is None else rtol,
        outputs=rules,
        top1={name: 1.0 for name in classes if name in names},
    )


def _too_noisy(measured: Mapping[str, float], peak: float, span: float) -> bool:
    """Whether what a family needs elementwise exceeds what any allowance may be."""
    needs = [CPU_ULPS * EPS32 * peak, MARGIN * measured["cpu"]] + [
        max(RANGE_FLOORS[f] * span, MARGIN * measured[f]) for f in ("cuda", "tensorrt")
    ]
    return max(needs) > _cap(float("inf"), peak)


def _norm_bound(family: str, measured: float) -> float:
    return round(min(MAX_NORM_RTOL, max(NORM_FLOORS[family], MARGIN * measured)), 9)


def _steps(need: float, step: float, peak: float) -> float:
    """Whole steps, at most MAX_STEPS and within what an allowance may be (the rule
    allows max_steps + 0.5 steps: agent.tolerance)."""
    most = math.floor(_cap((MAX_STEPS + 0.5) * step, peak) / step - 0.5)
    # Rounded first: a difference of exactly one step measures as 1.000005 steps in float32.
    return float(max(0, min(math.ceil(round(need, 3)), most)))


def check_rule(
    tolerance: Tolerance,
    references: Mapping[str, Mapping[str, np.ndarray]],
    replays: Mapping[str, list[Replay]],
) -> list[tuple[str, Replay, ToleranceReport]]:
    """Every replay judged by the rule, as the device would judge it on that family."""
    return [
        (
            fmt,
            replay,
            compare(tolerance.for_format(fmt), replay.family, references[fmt], replay.outputs),
        )
        for fmt, items in replays.items()
        for replay in items
        if fmt in references
    ]


class GoldenRuleError(ValueError):
    """The rule cannot be derived, or it refuses the model computed another way on a CPU."""


def _replays_for(
    fmt: str, path: Path, specs: tuple[Specs, Specs], golden: Mapping[str, np.ndarray]
) -> tuple[dict[str, float], list[Replay]]:
    try:
        if fmt == "onnx":
            return onnx_quant_steps(path), onnx_replays(path, specs, golden)
        names = [s.name for s in specs[1]]
        return tflite_quant_steps(path, names), tflite_replays(path, specs, golden)
    except Exception as exc:  # a runtime's or onnx's own errors: the model cannot be replayed
        raise GoldenRuleError(
            f"cannot replay the golden cases of {path.name} to derive its tolerance: {exc}"
        ) from exc


def reference_outputs(
    fmt: str, path: Path, specs: tuple[Specs, Specs], golden: Mapping[str, np.ndarray]
) -> Feeds:
    """The golden outputs as a device's CPU computes them by default (the agent's runtime)."""
    from agent.runtimes.litert import LiteRTRuntime
    from agent.runtimes.ort import OrtConfig, OrtRuntime

    runtime = (
        OrtRuntime(path, specs[0], specs[1], OrtConfig(providers=["CPUExecutionProvider"]))
        if fmt == "onnx"
        else LiteRTRuntime(path, specs[0], specs[1])
    )
    try:
        return runtime.run(dict(golden))
    finally:
        runtime.close()


def golden_rule(
    models: Mapping[str, Path],
    specs: tuple[Specs, Specs],
    golden: Mapping[str, np.ndarray],
    classes: Iterable[str] = (),
    references: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> tuple[Tolerance, dict[str, Mapping[str, np.ndarray]], dict[str, list[Replay]]]:
    """The rule for the bundle of `models` (format -> file): (rule, references, replays).

    `references` are the golden outputs the bundle records (edge-export package has
    them from its measuring child); None computes them here with the agent's runtimes.
    """
    refs: dict[str, Mapping[str, np.ndarray]] = {}
    steps: dict[str, dict[str, float]] = {}
    replays: dict[str, list[Replay]] = {}
    for fmt, path in models.items():
        refs[fmt] = (
            references[fmt]
            if references is not None and fmt in references
            else reference_outputs(fmt, path, specs, golden)
        )
        steps[fmt], replays[fmt] = _replays_for(fmt, path, specs, golden)
    rule = derive_tolerance(refs, steps, replays, classes, atol=atol, rtol=rtol)
    return rule, refs, replays


def judge(
    rule: Tolerance,
    references: Mapping[str, Mapping[str, np.ndarray]],
    replays: Mapping[str, list[Replay]],
    record: Callable[[str, ToleranceReport], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Judge every replay by the rule as the device would (`record` hears each, as
    "onnx cuda"); raise GoldenRuleError when the rule refuses the model on a CPU.
    Returns the bundle's figures: per format and family, how and the largest diffs."""
    figures: dict[str, dict[str, Any]] = {}
    refused: list[str] = []
    for fmt, replay, report in check_rule(rule, references, replays):
        label = f"{fmt} {replay.family}"
        if record is not None:
            record(label, report)
        figures.setdefault(fmt, {})[replay.family] = {
            "how": replay.how,
            # JSON has no NaN/inf (write_bundle refuses them): a non-finite diff is null.
            "max_abs_diff": {
                k: round(v, 9) if math.isfinite(v) else None for k, v in report.max_abs_diff.items()
            },
            "ok": report.ok,
        }
        if replay.fp16_overflow:
            figures[fmt][replay.family]["fp16_overflow"] = list(replay.fp16_overflow)
        if report.ok:
            log.info("golden rule accepts %s (%s)", label, replay.how)
        elif replay.family == "cpu":
            refused.append(f"{label} ({replay.how}): {'; '.join(report.failures)}")
        else:
            log.warning(
                "golden rule: %s (%s) would be refused on %s devices: %s",
                label, replay.how, replay.family, "; ".join(report.failures),
            )  # fmt: skip
    if refused:
        raise GoldenRuleError(
            "the golden tolerance refuses the model computed another way on a CPU: "
            + " | ".join(refused)
            + "; its outputs are too sensitive to rounding for golden cases to judge it"
        )
    return figures


def classifier_outputs(
    outputs: Iterable[tuple[str, tuple[int, ...]]], labels: list[str] | None
) -> list[str]:
    """Outputs whose last axis holds one score per label: their arg-max is the answer."""
    if not labels or len(labels) < 2:
        return []
    return [name for name, shape in outputs if shape and shape[-1] == len(labels)]


__all__ = [
    "GoldenRuleError",
    "Replay",
    "check_rule",
    "classifier_outputs",
    "derive_tolerance",
    "fp16_overflow",
    "golden_rule",
    "judge",
    "onnx_quant_steps",
    "onnx_replays",
    "reduced_precision",
    "reference_outputs",
    "tflite_quant_steps",
    "tflite_replays",
]
