"""Quality gates: each stage's accuracy (or cosine) against the recipe's budget.

A failing gate raises GateError naming the gate, the stage, the measured value,
the limit and the margin, e.g. "gate accuracy failed at onnx int8: 95.10% is
2.30 points below the teacher's 97.40%; the budget is 1.00".
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.tolerance import ToleranceReport
from export.pipeline.errors import GateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    gate: str
    stage: str
    value: float
    limit: float
    passed: bool
    detail: str
    # What GateError says if this result fails the build (raise_for): kept on the
    # result it explains, not in a table beside the results; the report has `detail`.
    message: str = field(default="", compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["message"]
        return out


class Gates:
    """Collects every check for the report; raises on the first failure."""

    def __init__(self, task: str, max_accuracy_drop: float, min_cosine: float) -> None:
        self.task = task
        self.max_accuracy_drop = max_accuracy_drop
        self.min_cosine = min_cosine
        self.baseline: float | None = None
        self.results: list[GateResult] = []

    @property
    def metric(self) -> str:
        return "accuracy" if self.task == "classification" else "cosine"

    def set_baseline(self, value: float) -> None:
        self.baseline = value

    def would_pass(self, value: float) -> bool:
        if self.task == "classification":
            assert self.baseline is not None, "set the teacher's accuracy first"
            return value >= self.baseline - self.max_accuracy_drop - 1e-9
        return value >= self.min_cosine - 1e-12

    def raise_for(self, result: GateResult) -> None:
        if not result.passed:
            message = (
                result.message or f"gate {result.gate} failed at {result.stage}: {result.detail}"
            )
            raise GateError(result.gate, result.stage, result.value, result.limit, message)

    def check(self, stage: str, value: float, soft: bool = False) -> GateResult:
        """Record the gate; raise GateError when it fails unless `soft` (then the caller
        decides, e.g. another INT8 method may pass, and calls raise_for)."""
        if self.task == "classification":
            assert self.baseline is not None, "set the teacher's accuracy first"
            floor = self.baseline - self.max_accuracy_drop
            drop = self.baseline - value
            passed = value >= floor - 1e-9
            change = f"drop {drop:.2f} points" if drop > 0 else f"{-drop:.2f} points above"
            detail = (
                f"{value:.2f}% vs teacher {self.baseline:.2f}%: {change}, "
                f"budget {self.max_accuracy_drop:.2f}"
            )
            message = (
                f"gate accuracy failed at {stage}: {value:.2f}% is {drop:.2f} points below the "
                f"teacher's {self.baseline:.2f}%; the budget (gates.max_accuracy_drop) is "
                f"{self.max_accuracy_drop:.2f}, exceeded by {drop - self.max_accuracy_drop:.2f}"
            )
            result = GateResult("accuracy", stage, value, floor, passed, detail, message)
        else:
            passed = value >= self.min_cosine - 1e-12
            detail = f"mean cosine to teacher {value:.4f}, minimum {self.min_cosine:.4f}"
            message = (
                f"gate cosine failed at {stage}: mean cosine to the teacher {value:.4f} is "
                f"{self.min_cosine - value:.4f} below gates.min_cosine = {self.min_cosine:.4f}"
            )
            result = GateResult("cosine", stage, value, self.min_cosine, passed, detail, message)
        self.results.append(result)
        log.info("gate %s at %s: %s (%s)", result.gate, stage, "pass" if passed else "FAIL",
                 detail)  # fmt: skip
        if not passed and not soft:
            raise GateError(result.gate, stage, value, result.limit, message)
        return result

    def record_parity(self, stage: str, diffs: dict[str, float], atol: float) -> None:
        worst = max(diffs.values()) if diffs else 0.0
        self.results.append(GateResult(
            "parity", stage, worst, atol, worst <= atol,
            "max abs diff " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()),
        ))  # fmt: skip

    def record_golden(self, stage: str, report: ToleranceReport) -> GateResult:
        """The bundle's own golden rule (agent.tolerance.compare, as the device runs it)
        on one replay of the golden cases, e.g. stage "onnx cuda". The value is the
        worst output's difference as a share of its allowance: at most 1 passes. A
        refusal on the CPU family fails the build; on a GPU family it is recorded (the
        bundle then cannot validate there) and the build goes on."""
        shares = [r.max_abs_diff / r.allowance if r.allowance else (0.0 if r.max_abs_diff == 0
                  else float("inf")) for r in report.outputs.values()]  # fmt: skip
        worst = max(shares, default=0.0)
        detail = ", ".join(
            f"{r.name} {r.max_abs_diff:.3g} of {r.allowance:.3g}"
            + (f", top-1 {r.top1:.0%}" if r.top1 is not None else "")
            for r in report.outputs.values()
        )
        if report.failures:
            detail += "; " + "; ".join(report.failures)
        result = GateResult("golden", stage, worst, 1.0, report.ok, detail)
        self.results.append(result)
        log.info("gate golden at %s: %s (%s)", stage, "pass" if report.ok else "FAIL", detail)
        if not report.ok and report.family == "cpu":
            raise GateError(
                "golden", stage, worst, 1.0,
                f"gate golden failed at {stage}: the bundle's tolerance refuses the model "
                f"computed another way on a CPU: {'; '.join(report.failures)}",
            )  # fmt: skip
        return result
