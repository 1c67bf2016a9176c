"""Quantization-aware training: fake-quant fine-tuning in torch, exported as ONNX QDQ.

The model's BatchNorms are folded into their convolutions first (torch.fx), so what
is trained is what is exported. Then every Conv/Linear is wrapped: its input goes
through a per-tensor fake quantizer whose scale is learned (LSQ, the learnable
`torch._fake_quantize_learnable_per_tensor_affine`), initialised from the
calibration rows at `percentile` (clipping rare outliers that would otherwise
stretch the range, which post-training minmax calibration cannot do); its weight
through a symmetric per-channel int8 fake quantizer (scale = max|w| / 127, straight-
through gradient). The fine-tune distils from the teacher, like the prune fine-tune.

Export swaps the learnable quantizers for fixed ones with the learned scales, so
torch.onnx writes QuantizeLinear/DequantizeLinear pairs with exactly the numbers
that were trained; the weights' QuantizeLinear are then folded into int8
initializers (the file shrinks like a static QDQ model's). ONNX Runtime runs the
result as any QDQ model. The TFLite QAT model is export.pipeline.tflite.convert_int8_qat
(litert-torch's PT2E QAT flow).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.pipeline.errors import ExportFailedError
from export.pipeline.loader import Split
from export.pipeline.torchrun import as_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QatConfig:
    epochs: int = 3
    lr: float = 5e-4
    percentile: float = 99.99  # initial activation range: this percentile of |x|
    symmetric_activations: bool = False  # int8 zero point 0 (TensorRT) vs uint8
    calibration_batches: int = 8


class ActFakeQuant(nn.Module):
    """Per-tensor activation fake quantization with a learned scale."""

    def __init__(self, symmetric: bool) -> None:
        super().__init__()
        self.qmin, self.qmax = (-128, 127) if symmetric else (0, 255)
        self.symmetric = symmetric
        self.scale = nn.Parameter(torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0.0]))
        self.samples: list[torch.Tensor] | None = None  # set while calibrating
        self.frozen = False  # export: fixed scale, the ONNX-exportable op

    def init_range(self, percentile: float) -> None:
        assert self.samples, "calibrate first"
        x = torch.cat([s.flatten() for s in self.samples]).float()
        lo = float(x.min())
        hi = float(torch.quantile(x.abs() if self.symmetric else x, percentile / 100.0))
        if self.symmetric:
            scale, zp = max(hi, 1e-8) / 127.0, 0.0
        else:
            lo = min(lo, 0.0)
            hi = max(hi, lo + 1e-8)
            scale = (hi - lo) / 255.0
            zp = float(np.clip(round(-lo / scale), 0, 255))
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(zp)
        self.samples = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.samples is not None:
            # Calibrating: keep a subsample (quantile() has a size limit), pass through.
            flat = x.detach().flatten()
            step = max(1, flat.numel() // 200_000)
            self.samples.append(flat[::step].clone())
            return x
        if self.frozen:
            return torch.fake_quantize_per_tensor_affine(
                x, float(self.scale.detach().abs()), int(self.zero_point.item()), self.qmin,
                self.qmax,
            )  # fmt: skip
        # LSQ gradient scale (Esser et al. 2020): 1 / sqrt(numel * qmax).
        grad = 1.0 / float(np.sqrt(x[0].numel() * self.qmax))
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale.abs() + 1e-12, self.zero_point, self.qmin, self.qmax, grad
        )


def _weight_scale(w: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, w.dim()))
    return (w.detach().abs().amax(dim=dims).clamp_min(1e-8) / 127.0).float()


class _WeightFq(nn.Module):
    """Symmetric per-output-channel int8 weights, straight-through. Frozen (export), the
    scale is a buffer, so the exported QuantizeLinear reads only initializers and
    `fold_weight_quantizers` can turn it into an int8 tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))
        self.frozen = False

    def freeze(self, w: torch.Tensor) -> None:
        self.scale.copy_(_weight_scale(w))
        self.frozen = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.frozen else _weight_scale(w)
        return torch.fake_quantize_per_channel_affine(w, scale, self.zero_point, 0, -128, 127)


class QatConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, symmetric: bool) -> None:
        super().__init__()
        self.conv = conv
        self.act = ActFakeQuant(symmetric)
        self.wfq = _WeightFq(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return c._conv_forward(self.act(x), self.wfq(c.weight), c.bias)


class QatLinear(nn.Module):
    def __init__(self, linear: nn.Linear, symmetric: bool) -> None:
        super().__init__()
        self.linear = linear
        self.act = ActFakeQuant(symmetric)
        self.wfq = _WeightFq(linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.act(x), self.wfq(self.linear.weight),
                                    self.linear.bias)  # fmt: skip


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Conv+BN folded (eval statistics), so the trained graph is the exported one."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # not traceable by torch.fx: train with BN unfolded
        log.warning("QAT: BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
        return copy.deepcopy(model)


def wrap(model: nn.Module, symmetric: bool) -> tuple[nn.Module, list[ActFakeQuant]]:
    model = fold_batchnorm(model)
    quantizers: list[ActFakeQuant] = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Conv2d | nn.Linear) and name:
            qmod: QatConv | QatLinear = (
                QatConv(mod, symmetric) if isinstance(mod, nn.Conv2d) else QatLinear(mod, symmetric)
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, qmod)
            quantizers.append(qmod.act)
    if not quantizers:
        raise ExportFailedError("QAT: the model has no Conv2d or Linear layer to quantize")
    if hasattr(model, "recompile"):
        model.recompile()  # torch.fx GraphModule: the call_module targets are unchanged
    return model, quantizers


def prepare(model: nn.Module, calibration: Split, names: Sequence[str], cfg: QatConfig,
            batch: int = 64) -> tuple[nn.Module, list[ActFakeQuant]]:  # fmt: skip
    """Wrapped model with activation ranges initialised from `calibration`."""
    qmodel, quantizers = wrap(model, cfg.symmetric_activations)
    for q in quantizers:
        q.samples = []
    qmodel.eval()
    with torch.no_grad():
        for i, part in enumerate(calibration.batches(batch)):
            if i >= cfg.calibration_batches:
                break
            qmodel(*as_tensors(part.inputs, names))
    for q in quantizers:
        q.init_range(cfg.percentile)
    return qmodel, quantizers


def freeze(model: nn.Module, quantizers: list[ActFakeQuant]) -> None:
    for q in quantizers:
        q.frozen = True
    for mod in model.modules():
        if isinstance(mod, QatConv):
            mod.wfq.freeze(mod.conv.weight)
        elif isinstance(mod, QatLinear):
            mod.wfq.freeze(mod.linear.weight)


def fold_weight_quantizers(path: Path) -> int:
    """QuantizeLinear nodes on constant weights -> int8 initializers feeding the
    DequantizeLinear (what ORT's own QDQ models look like); returns how many."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = consts.get(name)
        if node is not None:
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    folded = 0
    keep = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            vals = [value(i) for i in node.input]
            if all(v is not None for v in vals) and len(vals) == 3:
                x, scale, zp = vals
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                if scale is not None and scale.ndim == 1 and x is not None:
                    shape = [1] * x.ndim
                    shape[axis] = -1
                    scale = scale.reshape(shape)
                    zp = zp.reshape(shape) if zp is not None else zp
                assert x is not None and scale is not None and zp is not None
                info = np.iinfo(zp.dtype)
                q = np.clip(np.rint(x / scale) + zp, info.min, info.max).astype(zp.dtype)
                name = node.output[0]
                graph.initializer.append(numpy_helper.from_array(q, name))
                folded += 1
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    # The float weights (and Constant nodes) nothing reads any more go too.
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    nodes = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return folded


def train_and_export(
    model: nn.Module, teacher: nn.Module, splits: Any, recipe: Any, cfg: QatConfig, path: Path,
) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Fine-tune `model` (a copy) with fake quantization and write the QDQ ONNX to `path`."""
    from export.pipeline.distill import DistillConfig, distill
    from export.pipeline.onnx_export import export_onnx

    in_names = [t.name for t in recipe.inputs]
    out_names = list(recipe.outputs)
    n = recipe.dataset.calibration_samples
    calibration = splits.calibration.take(n) if n else splits.calibration
    qmodel, quantizers = prepare(model, calibration, in_names, cfg,
                                 batch=min(recipe.dataset.batch_size, 64))  # fmt: skip
    d = recipe.distill
    # Scales are learned at the same rate as weights; no decay on them.
    dcfg = DistillConfig(epochs=cfg.epochs, lr=cfg.lr, temperature=d.temperature, alpha=d.alpha,
                         loss=d.loss, batch_size=recipe.dataset.batch_size, weight_decay=0.0,
                         seed=recipe.seed)  # fmt: skip
    distill(qmodel, teacher, splits.train, in_names, out_names, dcfg, desc="qat fine-tune")
    qmodel.eval()
    freeze(qmodel, quantizers)
    export_onnx(qmodel, splits.eval, recipe.inputs, out_names, path, recipe.onnx.opset)
    folded = fold_weight_quantizers(path)
    info = {"epochs": cfg.epochs, "lr": cfg.lr, "percentile": cfg.percentile,
            "activation_quantizers": len(quantizers), "weights_folded": folded,
            "activation_scales": [round(float(q.scale.detach().abs()), 6) for q in quantizers]}  # fmt: skip
    log.info("QAT: %d layers, %d weight quantizers folded into int8", len(quantizers), folded)
    return path, info
