"""Typed build errors. Each says which step, what was wrong and by how much."""

from __future__ import annotations


class BuildError(Exception):
    """Base of every refusal by `edge-export build`; `code` is stable."""

    code = "build.failed"


class RecipeError(BuildError):
    """The recipe file is unreadable, malformed or inconsistent."""

    code = "build.recipe"


class LoadError(BuildError):
    """A `module:function` in the recipe cannot be imported or called."""

    code = "build.load"


class DatasetError(BuildError):
    """The dataset builder returned splits of the wrong shape, dtype or size."""

    code = "build.dataset"


class CalibrationError(BuildError):
    """Calibration had no data, or a quantizer was left uncalibrated."""

    code = "build.calibration"


class ExportFailedError(BuildError):
    """The model could not be exported (ONNX or TFLite)."""

    code = "build.export"


class ParityError(BuildError):
    """An exported model disagrees with its PyTorch source beyond tolerance."""

    code = "build.parity"

    def __init__(self, stage: str, max_abs_diff: dict[str, float], atol: float) -> None:
        self.stage = stage
        self.max_abs_diff = dict(max_abs_diff)
        self.atol = atol
        worst = ", ".join(f"{k}: {v:.3g}" for k, v in self.max_abs_diff.items())
        super().__init__(
            f"parity gate failed for {stage}: max abs diff per output ({worst}) exceeds "
            f"atol {atol:g}"
        )


class GateError(BuildError):
    """A quality gate failed: names the gate, the stage and the margin."""

    code = "build.gate"

    def __init__(self, gate: str, stage: str, value: float, limit: float, message: str) -> None:
        self.gate = gate
        self.stage = stage
        self.value = value
        self.limit = limit
        super().__init__(message)
