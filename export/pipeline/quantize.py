"""INT8 with ONNX Runtime: static QDQ (calibrated) or dynamic; plain API or Optimum's.

Presets are named after the target a bundle will run on; each picks the integer
types and symmetry the target's kernels are fastest and most accurate with. The
reasons are in the comments of PRESETS, because they are the part people need
to check when they add a target.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.pipeline.errors import CalibrationError, ExportFailedError
from export.pipeline.loader import Split
from export.pipeline.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    activations: str  # "uint8" | "int8"
    weights: str  # "int8"
    per_channel: bool
    reduce_range: bool
    activation_symmetric: bool
    weight_symmetric: bool
    extra: dict[str, Any] = field(default_factory=dict)
    target: str = ""  # the instruction set it is built for (HostIsa.arch + flags), for reports


# Why each preset sets what it sets. onnxruntime 1.31.1's quantize_static docstring on
# reduce_range: "quantize weights with 1 less bit of precision (e.g., 7 bits for QInt8).
# May improve the accuracy for some models running on non-VNNI machine, especially for
# per-channel mode." The issue's figure: the digits INT8 model built without it scored
# 99.77% on a VNNI Xeon and 98.84% on an AVX2 AMD EPYC.
_TRT = {"AddQDQPairToWeight": True, "DedicatedQDQPair": True, "QuantizeBias": False}
PRESETS: dict[str, Preset] = {
    # No particular target: ONNX Runtime's CPU defaults (u8 activations, s8 weights),
    # per-channel weights because they cost nothing at run time and recover accuracy.
    "none": Preset("uint8", "int8", True, False, False, True, target="any"),
    # x86-64 with AVX512-VNNI or AVX-VNNI (Ice Lake+, Sapphire Rapids, Zen 4+, Alder
    # Lake+): VPDPBUSD multiplies u8 x s8 and accumulates in int32 in one instruction,
    # so u8/s8 is the native pair and full 8-bit weights cost nothing.
    "x86_64-vnni": Preset(
        "uint8", "int8", True, False, False, True, target="x86_64 avx512_vnni|avx_vnni"
    ),
    # x86-64 without VNNI (AVX2, or AVX-512 without VNNI: Haswell..Skylake, Zen 1-3):
    # VPMADDUBSW adds two u8 x s8 products into a saturating int16; with full-range
    # weights the pair sum overflows (255*127*2 > 32767) and outputs clip. 7-bit weights
    # (reduce_range) keep the sum in range.
    "x86_64-avx2": Preset("uint8", "int8", True, True, False, True, target="x86_64 avx2 (no VNNI)"),
    # ARM64 without the dot-product extension (Cortex-A72: Raspberry Pi 4; A53, A57):
    # MLAS's NEON kernels widen 8x8 -> 16-bit products and pairwise-add into int32
    # (UMULL/UADALP), which cannot saturate, so full 8-bit weights are safe. Asymmetric
    # u8 activations keep the full range of post-ReLU tensors (all >= 0); symmetric
    # per-channel weights keep zero point 0 so the kernel skips a correction term.
    "arm64": Preset("uint8", "int8", True, False, False, True, target="aarch64 (no dotprod)"),
    # ARM64 with asimddp (Cortex-A55/A76/A78: Raspberry Pi 5, Jetson Orin's CPU,
    # Graviton 2+): SDOT/UDOT do four 8-bit products into int32 per lane; the same
    # u8 x s8 pair as above, on the dot-product kernels.
    "arm64-dotprod": Preset("uint8", "int8", True, False, False, True, target="aarch64 asimddp"),
    # NVIDIA Jetson (Orin, Xavier) with TensorRT's explicit quantization: TensorRT reads
    # QDQ pairs, supports only symmetric int8 (zero point 0) for activations and weights,
    # does its own bias handling (so biases stay float), and fuses best when every
    # consumer has its own QDQ pair on weights and activations.
    "jetson-orin": Preset(
        "int8", "int8", True, False, True, True, _TRT, target="Jetson (TensorRT)"
    ),
}
# Names from before the ISA presets; recipes that use them keep building the same models.
PRESET_ALIASES = {"avx512_vnni": "x86_64-vnni", "jetson-tensorrt": "jetson-orin"}


def resolve_preset(name: str, host: Any = None) -> tuple[str, str]:
    """A recipe's preset name -> (a key of PRESETS, why). "auto" follows `host`
    (export.pipeline.isa.HostIsa; the build host when None)."""
    if name == "auto":
        from export.pipeline.isa import detect_host, preset_for

        chosen, why = preset_for(host if host is not None else detect_host())
        return chosen, f"auto: {why}"
    if name in PRESET_ALIASES:
        return PRESET_ALIASES[name], f"{name!r} is the older name of {PRESET_ALIASES[name]!r}"
    return name, "named in the recipe"


CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")


@dataclass(frozen=True)
class QuantizeConfig:
    """Validates itself: an error names the bad value and the allowed ones."""

    mode: str = "static"
    preset: str = "none"
    calibration_method: str = "minmax"
    per_channel: bool | None = None
    engine: str = "onnxruntime"
    operators: tuple[str, ...] = ()
    batch_size: int = 32
    # Mixed precision (export.pipeline.mixed): only these nodes / all but these.
    nodes_to_quantize: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("mode", self.mode, ("static", "dynamic")),
            ("preset", self.preset, tuple(PRESETS) + tuple(PRESET_ALIASES)),
            ("calibration_method", self.calibration_method, CALIBRATION_METHODS),
            ("engine", self.engine, ("onnxruntime", "optimum")),
        ):
            if value not in allowed:
                raise ValueError(
                    f"QuantizeConfig.{name} = {value!r} is not supported; "
                    f"allowed: {', '.join(map(repr, allowed))}"
                )
        if self.engine == "optimum" and self.preset == "none":
            raise ValueError(
                "QuantizeConfig.preset = 'none' is not supported with engine 'optimum'; "
                "allowed: " + ", ".join(repr(p) for p in PRESETS if p != "none")
            )

    @property
    def settings(self) -> Preset:
        return PRESETS[PRESET_ALIASES.get(self.preset, self.preset)]

    @property
    def channelwise(self) -> bool:
        return self.settings.per_channel if self.per_channel is None else self.per_channel


class SplitReader:
    """onnxruntime CalibrationDataReader over the recipe's calibration split."""

    def __init__(self, split: Split, batch_size: int, desc: str = "calibrate") -> None:
        self.split = split
        self.batch_size = batch_size
        self.desc = desc
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self.batches_read = 0

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        # Histogram calibrators (entropy, percentile, distribution) stack per-batch
        # outputs and fail on a ragged last batch, so only full batches are fed.
        full = len(self.split) // self.batch_size
        rows = self.split.take(full * self.batch_size) if full else self.split
        if full and len(rows) < len(self.split):
            log.info("calibration: using %d of %d rows (whole batches of %d)", len(rows),
                     len(self.split), self.batch_size)  # fmt: skip
        total = max(1, full)
        for part in progress(rows.batches(self.batch_size), self.desc, total=total):
            self.batches_read += 1
            yield part.inputs

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._gen()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }[name]  # fmt: skip


def _require_calibration(split: Split | None, cfg: QuantizeConfig) -> Split:
    if cfg.mode != "static":
        raise AssertionError("calibration is for static quantization")
    if split is None or len(split) == 0:
        raise CalibrationError(
            "static INT8 needs calibration data but the calibration split is empty; "
            "give the dataset builder a non-empty 'calibration' split or set "
            "quantize.mode = 'dynamic'"
        )
    return split


def preprocess(src: Path, dst: Path) -> Path:
    """Shape inference + graph cleanup ORT recommends before static quantization; `src`
    itself where that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst
    except Exception as exc:  # the original graph still quantizes, just less well
        log.warning("quantization pre-processing skipped: %s", exc)
        return src


def quantize_onnx(
    src: Path,
    dst: Path,
    cfg: QuantizeConfig,
    calibration: Split | None = None,
    *,
    preprocessed: bool = False,
) -> Path:
    """Write an INT8 model of `src` to `dst`; returns dst. `preprocessed`: `src` is
    already `preprocess`'s output (the mixed search quantizes one model many times)."""
    with tempfile.TemporaryDirectory(prefix="edgerun-quant-") as tmp, _quiet_root():
        work = Path(tmp)
        if cfg.engine == "optimum":
            out = _quantize_optimum(src, work, cfg, calibration)
        else:
            out = _quantize_ort(src, work, cfg, calibration, preprocessed)
        shutil.move(str(out), dst)
    log.info(
        "INT8 %s (%s, preset %s, per-channel %s): %d -> %d bytes",
        cfg.mode, cfg.engine, cfg.preset, cfg.channelwise,
        src.stat().st_size, dst.stat().st_size,
    )  # fmt: skip
    return dst


@contextmanager
def _quiet_root() -> Iterator[None]:
    """onnxruntime.quantization logs one root INFO line per tensor and print()s calibration
    chatter; keep build logs readable and stdout for the CLI's result."""
    root = logging.getLogger()
    level = root.level
    if level < logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


def _extra(cfg: QuantizeConfig) -> dict[str, Any]:
    p = cfg.settings
    return {"ActivationSymmetric": p.activation_symmetric, "WeightSymmetric": p.weight_symmetric,
            **p.extra}  # fmt: skip


def _quantize_ort(
    src: Path, work: Path, cfg: QuantizeConfig, calibration: Split | None, preprocessed: bool
) -> Path:
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    out = work / "int8.onnx"
    ops = list(cfg.operators) or None
    p = cfg.settings
    try:
        if cfg.mode == "dynamic":
            quantize_dynamic(
                str(src), str(out), weight_type=_qtype(p.weights), per_channel=cfg.channelwise,
                reduce_range=p.reduce_range, op_types_to_quantize=ops,
                nodes_to_quantize=list(cfg.nodes_to_quantize) or None,
                nodes_to_exclude=list(cfg.nodes_to_exclude) or None,
                extra_options={"WeightSymmetric": p.weight_symmetric},
            )  # fmt: skip
            return out
        split = _require_calibration(calibration, cfg)
        model = src if preprocessed else preprocess(src, work / "pre.onnx")
        reader = SplitReader(split, cfg.batch_size)
        quantize_static(
            str(model), str(out), reader, quant_format=QuantFormat.QDQ,
            per_channel=cfg.channelwise, reduce_range=p.reduce_range,
            activation_type=_qtype(p.activations), weight_type=_qtype(p.weights),
            calibrate_method=_method(cfg.calibration_method), op_types_to_quantize=ops,
            nodes_to_quantize=list(cfg.nodes_to_quantize) or None,
            nodes_to_exclude=list(cfg.nodes_to_exclude) or None,
            extra_options=_extra(cfg),
        )  # fmt: skip
    except CalibrationError:
        raise
    except Exception as exc:
        raise ExportFailedError(
            f"onnxruntime {cfg.mode} quantization failed: {type(exc).__name__}: {exc}"
        ) from exc
    if reader.batches_read == 0:  # pragma: no cover - guarded above; belt and braces
        raise CalibrationError("the calibrator read no batches")
    return out


def optimum_config(cfg: QuantizeConfig) -> Any:
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    static = cfg.mode == "static"
    ops = list(cfg.operators) or None
    preset = PRESET_ALIASES.get(cfg.preset, cfg.preset)
    if preset == "jetson-orin":
        return AutoQuantizationConfig.tensorrt(per_channel=cfg.channelwise,
                                               operators_to_quantize=ops)  # fmt: skip
    if preset == "x86_64-avx2":
        return AutoQuantizationConfig.avx2(is_static=static, per_channel=cfg.channelwise,
                                           reduce_range=True, operators_to_quantize=ops)  # fmt: skip
    factory = {"arm64": AutoQuantizationConfig.arm64,
               "arm64-dotprod": AutoQuantizationConfig.arm64,
               "x86_64-vnni": AutoQuantizationConfig.avx512_vnni}[preset]  # fmt: skip
    return factory(is_static=static, per_channel=cfg.channelwise, operators_to_quantize=ops)


def _quantize_optimum(
    src: Path, work: Path, cfg: QuantizeConfig, calibration: Split | None
) -> Path:
    from optimum.onnxruntime import ORTQuantizer

    model_dir = work / "float"
    model_dir.mkdir()
    shutil.copy(src, model_dir / "model.onnx")
    qconfig = optimum_config(cfg)
    if cfg.nodes_to_exclude:
        qconfig.nodes_to_exclude = list(cfg.nodes_to_exclude)
    if cfg.nodes_to_quantize:
        qconfig.nodes_to_quantize = list(cfg.nodes_to_quantize)
    quantizer = ORTQuantizer.from_pretrained(model_dir, file_name="model.onnx")
    ranges = None
    if qconfig.is_static:
        split = _require_calibration(calibration, cfg)
        ranges = _calibrate(model_dir / "model.onnx", work, split, cfg, qconfig)
    try:
        out_dir = quantizer.quantize(qconfig, save_dir=work / "int8",
                                     calibration_tensors_range=ranges)  # fmt: skip
    except Exception as exc:
        raise ExportFailedError(
            f"Optimum ORTQuantizer failed: {type(exc).__name__}: {exc}"
        ) from exc
    return Path(out_dir) / "model_quantized.onnx"


def _calibrate(model: Path, work: Path, split: Split, cfg: QuantizeConfig, qconfig: Any) -> Any:
    """Collect activation ranges the way Optimum's fit() does, without HF datasets."""
    from onnxruntime.quantization.calibrate import create_calibrator

    ops = [getattr(o, "value", o) for o in qconfig.operators_to_quantize]
    calibrator = create_calibrator(
        str(model), ops, augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=_method(cfg.calibration_method),
        extra_options={"symmetric": qconfig.activations_symmetric},
    )  # fmt: skip
    reader = SplitReader(split, cfg.batch_size)
    calibrator.collect_data(reader)
    if reader.batches_read == 0:
        raise CalibrationError("the calibrator read no batches")
    return calibrator.compute_data()


def quantized_ops(path: Path) -> dict[str, int]:
    """Count of integer ops in a model (report + a check that INT8 really happened)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kinds = ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger",
             "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear")  # fmt: skip
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in kinds:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_int8(path: Path, stage: str) -> dict[str, int]:
    counts = quantized_ops(path)
    if not counts:
        raise ExportFailedError(
            f"{stage}: the quantized model has no integer ops; check quantize.operators"
        )
    return counts


def settings_summary(cfg: QuantizeConfig, ops: Sequence[str] = ()) -> dict[str, Any]:
    p = cfg.settings
    return {
        "engine": cfg.engine, "mode": cfg.mode, "preset": cfg.preset,
        "per_channel": cfg.channelwise,
        "calibration_method": cfg.calibration_method if cfg.mode == "static" else None,
        "activations": p.activations if cfg.mode == "static" else "uint8 (dynamic)",
        "weights": p.weights, "reduce_range": p.reduce_range,
        "operators": list(ops) or "default",
    }  # fmt: skip
