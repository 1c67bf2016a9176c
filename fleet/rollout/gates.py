"""Gates: the devices' own model signals that must hold after a wave's soak.

    --gate "p95_ms<=1.2x,error_rate<=0.01,agreement>=0.98"

Each part is `METRIC OP LIMIT`: a metric from `METRICS`, one of `<= >= < >`, and an
absolute limit (`0.01`) or one relative to **that device's own figure before the
update** (`1.2x`: the baseline recorded in ROLLOUT_BASELINE). A device that has no
figure for a gate after the soak (too few requests on the new model, no shadow run,
no baseline for a relative gate) is *inconclusive*: that fails the gate unless the
plan allows no data, and the result says so either way.

Figures come from a device's telemetry (`model.live`: the update watchdog's view of
the served model; `model.shadow`; the interval figures), as `figures_of(row)`.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.names import shown
from fleet.errors import FleetCode, FleetError
from fleet.ports import DeviceRow


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    help: str
    live: bool  # judged on the new model's live traffic: needs enough requests


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("p95_ms", "95th percentile latency of the served model (ms)", True),
        Metric("p50_ms", "median latency of the served model (ms)", True),
        Metric("error_rate", "share of requests answered with an error", True),
        Metric("nonfinite_rate", "share of answers with NaN/inf or empty outputs", True),
        Metric("agreement", "shadow evaluation: top-1 agreement with the served model", False),
        Metric("rss_mb", "the agent's resident memory (MB)", False),
        Metric("rate_per_s", "requests per second in the latest telemetry interval", False),
        Metric("temperature_c", "hottest thermal zone (C)", False),
    )
}

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_GATE_RE = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)\s*(x?)\s*"
)
MAX_GATES = 32


def _known() -> str:
    return ", ".join(METRICS)


@dataclass(frozen=True, slots=True)
class Gate:
    metric: str
    op: str
    limit: float
    relative: bool  # limit x the device's own baseline figure

    @property
    def text(self) -> str:
        # Exact (the plan is recorded as text and parsed back): no %g rounding.
        limit = float(self.limit)
        number = str(int(limit)) if limit.is_integer() and abs(limit) < 1e15 else repr(limit)
        return f"{self.metric}{self.op}{number}{'x' if self.relative else ''}"

    def limit_for(self, baseline: float | None) -> float | None:
        if not self.relative:
            return self.limit
        return None if baseline is None else self.limit * baseline

    def check(self, figure: float, limit: float) -> bool:
        return _OPS[self.op](figure, limit)


def parse_gate(text: str) -> Gate:
    m = _GATE_RE.fullmatch(text)
    if m is None:
        raise FleetError(
            FleetCode.BAD_INPUT,
            f"gate {shown(text)}: write METRIC OP LIMIT, e.g. p95_ms<=1.2x or error_rate<=0.01 "
            f"(operators <= >= < >; a limit ending in x is relative to the device's own figure "
            f"before the update); known metrics: {_known()}",
            gate=text,
        )
    name, op, number, rel = m.groups()
    if name not in METRICS:
        raise FleetError(
            FleetCode.BAD_INPUT,
            f"gate {shown(text.strip())}: unknown metric {name!r}; known metrics: {_known()}",
            gate=text,
        )
    limit = float(number)
    if not math.isfinite(limit):
        raise FleetError(
            FleetCode.BAD_INPUT, f"gate {shown(text.strip())}: the limit must be finite", gate=text
        )
    if rel and limit <= 0:
        raise FleetError(
            FleetCode.BAD_INPUT,
            f"gate {shown(text.strip())}: a relative limit must be above 0x",
            gate=text,
        )
    return Gate(name, op, limit, bool(rel))


def parse_gates(text: str) -> tuple[Gate, ...]:
    """`"a<=1.2x, b<=0.01"` -> gates; an empty string is no gates."""
    if not isinstance(text, str):
        raise FleetError(FleetCode.BAD_INPUT, f"gates must be text, got {shown(text)}")
    if not text.strip():
        return ()
    parts = text.split(",")
    if len(parts) > MAX_GATES:
        raise FleetError(FleetCode.BAD_INPUT, f"at most {MAX_GATES} gates, got {len(parts)}")
    gates = tuple(parse_gate(part) for part in parts)
    texts = [g.text for g in gates]
    if len(set(texts)) != len(texts):
        raise FleetError(FleetCode.BAD_INPUT, f"gates repeat: {', '.join(texts)}")
    return gates


# ---------------------------------------------------------------------------- figures


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def figures_of(row: DeviceRow) -> dict[str, Any]:
    """One device's figures as gates read them (and ROLLOUT_BASELINE records them)."""
    live, shadow = row.live or {}, row.shadow or {}
    return {
        "version": row.model_version,
        "sha256": row.model_sha256,
        "previous_version": row.previous_version,
        "generation": live.get("generation"),
        "requests": _num(live.get("requests")),
        "p95_ms": _num(live.get("p95_ms")) if "p95_ms" in live else row.p95_ms,
        "p50_ms": _num(live.get("p50_ms")),
        "error_rate": _num(live.get("error_rate")) if "error_rate" in live else row.error_rate,
        "nonfinite_rate": _num(live.get("nonfinite_rate")),
        "agreement": _num(shadow.get("agreement")),
        "rss_mb": row.rss_mb,
        "rate_per_s": row.rate_per_s,
        "temperature_c": row.temperature_c,
    }


def is_new_model(after: Mapping[str, Any], baseline: Mapping[str, Any], version: str) -> bool:
    """Do `after`'s live figures describe the new model? Its version is served, and the
    live figures are of another generation than before (when the device names them)."""
    if after.get("version") != version:
        return False
    gen_after, gen_before = after.get("generation"), baseline.get("generation")
    return gen_after is None or gen_before is None or gen_after != gen_before


@dataclass(frozen=True, slots=True)
class GateResult:
    device_id: str
    gate: str
    metric: str
    figure: float | None
    baseline: float | None
    limit: float | None
    passed: bool
    inconclusive: bool = False
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "gate": self.gate,
            "metric": self.metric,
            "figure": self.figure,
            "baseline": self.baseline,
            "limit": self.limit,
            "passed": self.passed,
            "inconclusive": self.inconclusive,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> GateResult:
        return cls(
            device_id=str(doc["device_id"]),
            gate=str(doc["gate"]),
            metric=str(doc["metric"]),
            figure=_num(doc.get("figure")),
            baseline=_num(doc.get("baseline")),
            limit=_num(doc.get("limit")),
            passed=bool(doc["passed"]),
            inconclusive=bool(doc.get("inconclusive", False)),
            reason=str(doc.get("reason", "")),
        )

    def describe(self) -> str:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        verdict = "passed" if self.passed else "FAILED"
        rel = f" (baseline {f(self.baseline)})" if self.baseline is not None else ""
        text = f"{self.device_id}: {self.gate} {verdict}: {f(self.figure)} vs limit {f(self.limit)}"
        return text + rel + (f"; {self.reason}" if self.reason else "")


def evaluate(
    gate: Gate,
    device: str,
    after: Mapping[str, Any],
    baseline: Mapping[str, Any],
    *,
    min_requests: int,
    allow_no_data: bool,
    fresh: bool = True,
) -> GateResult:
    """Judge one gate on one device. `fresh`: `after` describes the new model."""
    metric = METRICS[gate.metric]
    base = _num(baseline.get(gate.metric))
    figure = _num(after.get(gate.metric))
    limit = gate.limit_for(base)

    def no_data(reason: str) -> GateResult:
        reason += "; allowed (--allow-no-data)" if allow_no_data else "; counts as failed"
        return GateResult(
            device, gate.text, gate.metric, figure, base, limit, allow_no_data, True, reason
        )

    if metric.live:
        if not fresh:
            return no_data("no live figures of the new model yet")
        requests = _num(after.get("requests")) or 0.0
        if requests < min_requests:
            return no_data(f"{requests:g} requests on the new model, fewer than {min_requests}")
    if figure is None:
        return no_data(f"the device reports no {gate.metric}")
    if limit is None:
        return no_data(f"no {gate.metric} before the update to compare with")
    passed = gate.check(figure, limit)
    return GateResult(device, gate.text, gate.metric, figure, base, limit, passed)
