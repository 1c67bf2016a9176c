"""What the variant choice found, per variant: the figures status, events and the cache carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agent.bundle import Variant

# A result's status: served (the chosen one), passed (measured, slower), failed (its
# validation refused it here), skipped (no runtime here loads it, or a pin excludes
# it), unmeasured (served alone: nothing to compare it with).
SERVED, PASSED, FAILED, SKIPPED = "served", "passed", "failed", "skipped"
_MAX_REASON = 400


@dataclass(frozen=True)
class Candidate:
    """A variant and the runtime here that would load it."""

    variant: Variant
    runtime: str


@dataclass
class VariantResult:
    id: str
    format: str
    status: str
    reason: str
    runtime: str | None = None
    precision: str | None = None
    method: str | None = None
    code: str | None = None  # the stable error code of a failure
    p50_ms: float | None = None
    peak_mb: float | None = None
    golden_max_diff: float | None = None

    @classmethod
    def of(cls, variant: Variant, status: str, reason: str, **figures: Any) -> VariantResult:
        return cls(
            id=variant.id,
            format=variant.format,
            status=status,
            reason=reason[:_MAX_REASON],
            precision=variant.precision,
            method=variant.method,
            **figures,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> VariantResult | None:
        """A result read back from the cache; None if it is not one (cache is then a miss)."""
        if not isinstance(raw, dict):
            return None
        try:
            result = cls(**raw)
        except TypeError:
            return None
        texts = (result.id, result.format, result.status, result.reason)
        if not all(isinstance(t, str) for t in texts):
            return None
        numbers = (result.p50_ms, result.peak_mb, result.golden_max_diff)
        if not all(n is None or isinstance(n, int | float) for n in numbers):
            return None
        return result


@dataclass
class Selection:
    """Which variant serves and why, with every variant's result."""

    chosen: str
    runtime: str
    reason: str
    batch: int = 1  # rows of the latency probe (0: not measured)
    cached: bool = False
    results: list[VariantResult] = field(default_factory=list)

    @property
    def measured(self) -> int:
        return sum(1 for r in self.results if r.status in (SERVED, PASSED, FAILED))

    def to_json(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "runtime": self.runtime,
            "reason": self.reason,
            "batch": self.batch,
            "cached": self.cached,
            "variants": [r.to_json() for r in self.results],
        }


__all__ = ["FAILED", "PASSED", "SERVED", "SKIPPED", "Candidate", "Selection", "VariantResult"]
