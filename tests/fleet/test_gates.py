"""Gates: parsing (every refusal names the wrong part and the known metrics), absolute and
relative limits against each device's own baseline, and inconclusive (no data) results."""

from __future__ import annotations

import pytest

from fleet.errors import FleetCode, FleetError
from fleet.ports import DeviceRow
from fleet.rollout.gates import (
    METRICS,
    GateResult,
    evaluate,
    figures_of,
    is_new_model,
    parse_gate,
    parse_gates,
)


def test_parse_the_issue_example() -> None:
    gates = parse_gates("p95_ms<=1.2x,error_rate<=0.01,agreement>=0.98")
    assert [(g.metric, g.op, g.limit, g.relative) for g in gates] == [
        ("p95_ms", "<=", 1.2, True),
        ("error_rate", "<=", 0.01, False),
        ("agreement", ">=", 0.98, False),
    ]
    assert [g.text for g in gates] == ["p95_ms<=1.2x", "error_rate<=0.01", "agreement>=0.98"]
    assert parse_gates(" rss_mb < 300 , p50_ms>0 ")[0].text == "rss_mb<300"
    assert parse_gates("") == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("p99_ms<=2x", "unknown metric 'p99_ms'; known metrics: p95_ms, p50_ms"),
        ("p95_ms=<1.2x", "write METRIC OP LIMIT"),
        ("p95_ms<=", "write METRIC OP LIMIT"),
        ("p95_ms<=fast", "write METRIC OP LIMIT"),
        ("p95_ms<=1.2y", "write METRIC OP LIMIT"),
        ("<=1.2x", "write METRIC OP LIMIT"),
        ("p95_ms<=0x", "relative limit must be above 0x"),
        ("p95_ms<=1e999", "finite"),
        ("p95_ms<=1.2x,,error_rate<=0.1", "gate ''"),
        ("p95_ms<=1.2x,p95_ms<=1.2x", "gates repeat"),
    ],
)
def test_bad_gates_are_refused_naming_the_part(text: str, match: str) -> None:
    with pytest.raises(FleetError, match=match) as info:
        parse_gates(text)
    assert info.value.code is FleetCode.BAD_INPUT
    if "METRIC OP LIMIT" in match:
        assert "known metrics: " + ", ".join(METRICS) in info.value.message


def test_too_many_gates() -> None:
    with pytest.raises(FleetError, match="at most 32 gates"):
        parse_gates(",".join(f"p95_ms<={i}" for i in range(40)))


def row(**kw: object) -> DeviceRow:
    return DeviceRow(device_id="d1", **kw)  # type: ignore[arg-type]


BEFORE = figures_of(
    row(
        model_version="1.0.0",
        p95_ms=9.0,  # interval figure: the live one wins when there is one
        rss_mb=80.0,
        live={"generation": 1, "requests": 500, "p95_ms": 2.0, "error_rate": 0.0},
    )
)


def after(**live: object) -> dict[str, object]:
    return figures_of(
        row(
            model_version="2.0.0",
            rss_mb=95.0,
            live={"generation": 2, "requests": 100, **live},
            shadow={"agreement": 0.97},
        )
    )


def judge(text: str, figures: dict[str, object], **kw: object) -> GateResult:
    options: dict[str, object] = {"min_requests": 10, "allow_no_data": False, **kw}
    return evaluate(parse_gate(text), "d1", figures, BEFORE, **options)  # type: ignore[arg-type]


def test_relative_gate_against_the_devices_own_baseline() -> None:
    ok = judge("p95_ms<=1.2x", after(p95_ms=2.3))
    assert ok.passed and not ok.inconclusive
    assert (ok.figure, ok.baseline, ok.limit) == (2.3, 2.0, pytest.approx(2.4))
    bad = judge("p95_ms<=1.2x", after(p95_ms=2.5))
    assert not bad.passed and bad.limit == pytest.approx(2.4)
    assert "FAILED: 2.5 vs limit 2.4 (baseline 2)" in bad.describe()


def test_absolute_gates_and_every_operator() -> None:
    assert judge("error_rate<=0.01", after(error_rate=0.01)).passed
    assert not judge("error_rate<0.01", after(error_rate=0.01)).passed
    assert not judge("agreement>=0.98", after()).passed
    assert judge("agreement>0.9", after()).passed
    assert judge("rss_mb<=1.2x", after()).passed  # 95 <= 96
    assert not judge("rss_mb<=1.1x", after()).passed  # 95 > 88


def test_too_few_requests_on_the_new_model_is_inconclusive_and_fails() -> None:
    result = judge("p95_ms<=1.2x", after(p95_ms=1.0, requests=3))
    assert result.inconclusive and not result.passed
    assert "3 requests on the new model, fewer than 10; counts as failed" in result.reason
    allowed = judge("p95_ms<=1.2x", after(p95_ms=1.0, requests=3), allow_no_data=True)
    assert allowed.inconclusive and allowed.passed and "allowed" in allowed.reason


def test_stale_figures_of_the_old_model_are_no_data() -> None:
    old = figures_of(
        row(model_version="2.0.0", live={"generation": 1, "requests": 900, "p95_ms": 1})
    )
    assert not is_new_model(old, BEFORE, "2.0.0")  # the same generation as before the update
    assert not is_new_model(after(), BEFORE, "3.0.0")  # another version is served
    assert is_new_model(after(), BEFORE, "2.0.0")
    result = judge("p95_ms<=1.2x", old, fresh=False)
    assert result.inconclusive and not result.passed and "no live figures" in result.reason


def test_a_missing_metric_or_baseline_is_inconclusive() -> None:
    no_metric = judge("nonfinite_rate<=0", after())
    assert no_metric.inconclusive and "reports no nonfinite_rate" in no_metric.reason
    no_base = evaluate(
        parse_gate("p95_ms<=1.2x"),
        "d1",
        after(p95_ms=1.0),
        {},
        min_requests=10,
        allow_no_data=False,
    )
    assert no_base.inconclusive and "no p95_ms before the update" in no_base.reason
    # A shadow figure does not need live requests; none reported is no data.
    no_shadow = evaluate(
        parse_gate("agreement>=0.9"), "d1", BEFORE, BEFORE, min_requests=10, allow_no_data=False
    )
    assert no_shadow.inconclusive


def test_result_json_round_trip() -> None:
    result = judge("p95_ms<=1.2x", after(p95_ms=2.5))
    assert GateResult.from_json(result.to_json()) == result


@pytest.mark.parametrize(
    "text",
    ["p95_ms<=1.2x", "error_rate<=0.0123456789", "rss_mb<300", "p50_ms>1e-05", "p95_ms<2.5e+20"],
)
def test_gate_text_round_trips_exactly(text: str) -> None:
    gate = parse_gate(text)
    assert parse_gate(gate.text) == gate  # the plan is recorded as text and parsed back
