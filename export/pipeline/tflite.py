"""TFLite through litert-torch: a float model and a full-integer INT8 model (PT2E).

INT8 follows PyTorch 2 Export quantization: export the graph, insert observers
with litert-torch's PT2EQuantizer (static, symmetric per-channel weights),
run the calibration split through it, convert, then lower to TFLite.

The known silent failure: skip the calibration pass (or feed it nothing) and
conversion still succeeds, with observers that never saw data producing
scalar or infinite scales, i.e. a model that runs and outputs garbage. Here an
empty split fails before export, every observer is checked after calibration,
and the converted model must both contain int8 tensors and respond to its
input before it can become a candidate.

litert-torch freezes the batch axis in the TFLite graph (reshapes get constant
shapes), so the model is converted at a fixed batch (`tflite.batch`, 1 by
default) and runners feed larger requests in slices.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.pipeline.errors import CalibrationError, ExportFailedError
from export.pipeline.loader import Split
from export.pipeline.progress import is_tty, progress
from export.pipeline.runners import TfliteRunner
from export.pipeline.torchrun import as_tensors

log = logging.getLogger(__name__)


@contextmanager
def _quiet() -> Any:
    # litert-torch and JAX are chatty on import and conversion; keep build logs readable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # litert-torch prints a step tree while converting: on a terminal only.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "y" if is_tty() else "n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _sample(split: Split, names: Sequence[str], batch: int) -> tuple[torch.Tensor, ...]:
    part = split.take(batch)
    if len(part) < batch:  # too few rows: repeat the last to fill the frozen batch
        short = batch - len(part)
        part = Split({k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)])
                      for k, v in part.inputs.items()}, None)  # fmt: skip
    return as_tensors(part.inputs, names)


def convert_float(model: torch.nn.Module, sample_split: Split, names: Sequence[str],
                  path: Path, batch: int) -> Path:  # fmt: skip
    with _quiet():
        import litert_torch

        sample = _sample(sample_split, names, batch)
        try:
            edge = litert_torch.convert(model.eval(), sample)
            edge.export(str(path))
        except Exception as exc:
            raise ExportFailedError(
                f"litert-torch could not convert the model to TFLite: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:400] if str(exc) else ''}"
            ) from exc
    log.info("TFLite float: %s (%d bytes)", path.name, path.stat().st_size)
    return path


def observers_uncalibrated(prepared: torch.nn.Module) -> list[str]:
    """Names of observers that never saw finite data (the silent-failure signature)."""
    bad = []
    for name, mod in prepared.named_modules():
        lo, hi = getattr(mod, "min_val", None), getattr(mod, "max_val", None)
        if not isinstance(lo, torch.Tensor) or not isinstance(hi, torch.Tensor):
            continue
        if (
            lo.numel() == 0
            or hi.numel() == 0
            or not bool(torch.isfinite(lo).all())
            or not bool(torch.isfinite(hi).all())
        ):
            bad.append(name)
    return bad


def convert_int8(
    model: torch.nn.Module, calibration: Split, names: Sequence[str], path: Path, batch: int,
    per_channel: bool = True, max_rows: int = 0,
) -> Path:  # fmt: skip
    if len(calibration) == 0:
        raise CalibrationError(
            "TFLite INT8 needs calibration data but the calibration split is empty; an "
            "uncalibrated PT2E model converts without error and outputs garbage"
        )
    with _quiet():
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer as pq
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import allow_exported_model_train_eval, quantize_pt2e

        sample = _sample(calibration, names, batch)
        quantizer = pq.PT2EQuantizer().set_global(
            pq.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
        )
        try:
            graph = torch.export.export(model.eval(), sample).module()
            prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
            allow_exported_model_train_eval(prepared).eval()  # calibrate in eval mode
        except Exception as exc:
            raise ExportFailedError(
                f"PT2E export/prepare failed: {type(exc).__name__}: {str(exc)[:400]}"
            ) from exc
        rows = calibration if not max_rows else calibration.take(max_rows)
        steps = math.ceil(len(rows) / batch)
        with torch.no_grad():
            for part in progress(rows.batches(batch), "calibrate tflite", total=steps):
                prepared(*_sample(part, names, batch))
        bad = observers_uncalibrated(prepared)
        if bad:
            raise CalibrationError(
                f"{len(bad)} PT2E observer(s) saw no finite data after calibration "
                f"(first: {bad[0]}); the INT8 model would be silently wrong"
            )
        try:
            converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            # An exported graph has no .eval(); without this, BatchNorm/Dropout would be
            # lowered in training mode.
            allow_exported_model_train_eval(converted).eval()
            for module in converted.modules():  # eval() above swaps ops, not the flag
                module.training = False
            edge = litert_torch.convert(converted, sample,
                                        quant_config=QuantConfig(pt2e_quantizer=quantizer))  # fmt: skip
            edge.export(str(path))
        except Exception as exc:
            raise ExportFailedError(
                f"litert-torch could not convert the INT8 model: {type(exc).__name__}: "
                f"{str(exc)[:400]}"
            ) from exc
    check_int8_tflite(path, calibration, names)
    log.info("TFLite INT8: %s (%d bytes)", path.name, path.stat().st_size)
    return path


def check_int8_tflite(path: Path, probe: Split, names: Sequence[str]) -> None:
    """The converted model must hold int8 tensors and its output must depend on its input."""
    runner = TfliteRunner(path)
    int8 = [d for d in runner.interp.get_tensor_details() if np.dtype(d["dtype"]) == np.int8]
    if not int8:
        raise ExportFailedError(f"{path.name} has no int8 tensors: quantization did not happen")
    rows = probe.take(8)
    if len(rows) >= 2:
        outs = runner.run([rows.inputs[n] for n in names])[0]
        if not np.all(np.isfinite(outs)) or float(np.ptp(outs, axis=0).max()) == 0.0:
            raise CalibrationError(
                f"{path.name} gives the same (or non-finite) output for different inputs: "
                "the quantization parameters are degenerate"
            )


def convert_int8_qat(
    model: torch.nn.Module, teacher: torch.nn.Module, splits: Any, recipe: Any, path: Path,
) -> Path:  # fmt: skip
    """Full-integer TFLite by quantization-aware training (PT2E QAT, litert-torch's
    symmetric per-channel config): BN folded, `prepare_qat_pt2e`, fine-tuned by
    distillation from the teacher (`quantize.qat_epochs`, `qat_lr`), converted.

    litert-torch 0.10.0's QAT annotator builds its conv+BN patterns by exporting a
    plain function, which torch 2.13's torch.export refuses ("Expected `mod` to be an
    instance of `torch.nn.Module`"); with BatchNorm folded first those patterns have
    nothing to match, so the quantizer here leaves them out. Its observers are
    moving-average minmax: unlike the ONNX QAT path (export.pipeline.qat) the ranges
    are not learned or clipped.
    """
    from export.pipeline.distill import DistillConfig, distill
    from export.pipeline.qat import fold_batchnorm

    names = [t.name for t in recipe.inputs]
    q, tf = recipe.quantize, recipe.tflite
    n = recipe.dataset.calibration_samples
    calibration = splits.calibration.take(n) if n else splits.calibration
    if len(calibration) == 0:
        raise CalibrationError("TFLite QAT needs calibration rows to start its observers")
    with _quiet():
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer as pq
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import allow_exported_model_train_eval, quantize_pt2e

        class _FoldedQat(pq.PT2EQuantizer):  # type: ignore[misc]
            STATIC_QAT_ONLY_OPS: list[str] = []  # conv+BN: folded already

        quantizer = _FoldedQat().set_global(
            pq.get_symmetric_quantization_config(is_per_channel=tf.per_channel, is_qat=True)
        )
        folded = fold_batchnorm(model)
        sample = as_tensors(calibration.take(min(8, len(calibration))).inputs, names)
        batch = torch.export.Dim("batch", min=1, max=65536)
        try:
            graph = torch.export.export(
                folded, sample, dynamic_shapes=tuple({0: batch} for _ in sample)
            ).module()
            prepared = quantize_pt2e.prepare_qat_pt2e(graph, quantizer)
            allow_exported_model_train_eval(prepared)
        except Exception as exc:
            raise ExportFailedError(
                f"PT2E QAT export/prepare failed: {type(exc).__name__}: {str(exc)[:400]}"
            ) from exc
        d = recipe.distill
        cfg = DistillConfig(epochs=q.qat_epochs, lr=q.qat_lr, temperature=d.temperature,
                            alpha=d.alpha, loss=d.loss, batch_size=recipe.dataset.batch_size,
                            weight_decay=0.0, seed=recipe.seed)  # fmt: skip
        distill(prepared, teacher, splits.train, names, list(recipe.outputs), cfg,
                desc="tflite qat fine-tune")  # fmt: skip
        prepared.eval()
        try:
            converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            allow_exported_model_train_eval(converted).eval()
            for module in converted.modules():
                module.training = False
            edge = litert_torch.convert(converted, _sample(calibration, names, tf.batch),
                                        quant_config=QuantConfig(pt2e_quantizer=quantizer))  # fmt: skip
            edge.export(str(path))
        except Exception as exc:
            raise ExportFailedError(
                f"litert-torch could not convert the QAT INT8 model: {type(exc).__name__}: "
                f"{str(exc)[:400]}"
            ) from exc
    check_int8_tflite(path, calibration, names)
    log.info("TFLite INT8 (QAT): %s (%d bytes)", path.name, path.stat().st_size)
    return path
