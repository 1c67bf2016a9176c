"""The rollout plan: every refusal names the field and what is allowed; wave arithmetic;
maintenance windows; the JSON round trip the record relies on."""

from __future__ import annotations

import calendar
import time

import pytest

from fleet.errors import FleetCode, FleetError
from fleet.rollout.plan import Count, RolloutPlan, Window


def ids(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def refused(match: str, **kw: object) -> FleetError:
    with pytest.raises(FleetError, match=match) as info:
        RolloutPlan(**kw)  # type: ignore[arg-type]
    assert info.value.code is FleetCode.BAD_INPUT
    return info.value


# ------------------------------------------------------------------------ waves


def test_canary_one_percent_then_quarter_waves_of_a_thousand() -> None:
    plan = RolloutPlan(targets=("all",), canary="1%", wave="25%")
    waves = plan.waves(ids(1000))
    assert [len(w) for w in waves] == [10, 250, 250, 250, 240]
    assert waves[0] == ids(1000)[:10]  # sorted ids, canary first
    assert [d for w in waves for d in w] == ids(1000)  # every device exactly once


def test_one_percent_of_a_few_devices_is_still_one_device() -> None:
    plan = RolloutPlan(targets=("all",), canary="1%", wave="25%")
    assert [len(w) for w in plan.waves(ids(3))] == [1, 1, 1]
    assert plan.wave_sizes(1) == [1]
    assert plan.wave_sizes(0) == []


def test_fixed_count_waves_and_a_canary_bigger_than_the_fleet() -> None:
    plan = RolloutPlan(targets=("all",), canary=2, wave="5")
    assert plan.wave_sizes(13) == [2, 5, 5, 1]
    assert RolloutPlan(targets=("all",), canary=20).wave_sizes(7) == [7]


def test_exponential_rate_and_factor() -> None:
    plan = RolloutPlan(targets=("all",), canary=1, rate=5, factor=2.0)
    assert plan.wave_sizes(1 + 5 + 10 + 20 + 40 + 3) == [1, 5, 10, 20, 40, 3]
    slow = RolloutPlan(targets=("all",), canary=1, rate=2, factor=1.5)
    assert slow.wave_sizes(12) == [
        1,
        2,
        3,
        4,
        2,
    ]  # int(2*1.5**k): 2, 3, 4, 6 -> cut to what is left


def test_waves_are_deterministic_whatever_the_order_given() -> None:
    plan = RolloutPlan(targets=("group:line-1",), canary=2, wave="25%")
    devices = ids(50)
    assert plan.waves(reversed(devices)) == plan.waves(devices)
    assert [len(w) for w in plan.waves(devices)] == [2, 13, 13, 13, 9]


def test_a_plan_with_too_many_waves_is_refused() -> None:
    plan = RolloutPlan(targets=("all",), canary=1, rate=1, factor=1.0)
    with pytest.raises(FleetError, match="at most 10000 waves"):
        plan.wave_sizes(20_000)


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"targets": ()}, "at least one"),
        ({"targets": "all"}, "a list of device ids"),
        ({"targets": ("group:",)}, "group:NAME"),
        ({"targets": ("bad id",)}, "device id"),
        ({"targets": ("console",)}, "reserved"),
        ({"canary": "0"}, "canary must be a whole number of devices, 1 or more"),
        ({"canary": "0%"}, "canary must be a share above 0%"),
        ({"canary": "101%"}, "at most 100%"),
        ({"canary": "1.5"}, "whole number"),
        ({"canary": "two"}, 'canary must be a number of devices "N" or a share "N%"'),
        ({"wave": "-5"}, "wave must be"),
        ({"wave": "25%", "rate": 5}, "fixed waves .--wave. or exponential"),
        ({"rate": 0}, "rate must be a whole number"),
        ({"rate": True}, "rate must be"),
        ({"rate": 5, "factor": 0.5}, "factor must be a number from 1 to 100"),
        ({"factor": 3.0}, "factor must be given only with --rate"),
        ({"success_threshold": 101}, "success_threshold must be a number from 0 to 100"),
        ({"abort_threshold": float("nan")}, "abort_threshold must be"),
        ({"abort_min_finished": -1}, "abort_min_finished must be a whole number"),
        ({"soak_s": -1}, "soak_s must be"),
        ({"device_timeout_s": 0}, "device_timeout_s must be a number from 0.1"),
        ({"via": "ftp"}, 'via must be "http" or "mqtt"'),
        ({"windows": ("line-2=22:00",)}, "GROUP=HH:MM-HH:MM"),
        ({"windows": ("line-2=25:00-04:00",)}, "00:00 to 23:59"),
        ({"windows": ("line-2=04:00-04:00",)}, "differ"),
        ({"windows": ("a=01:00-02:00", "a=03:00-04:00")}, "one window per group"),
        ({"trial_window_s": -2}, "trial_window_s must be"),
        ({"shadow": "yes"}, "shadow must be true or false"),
        ({"gates": "p99<=2x"}, "unknown metric 'p99'"),
    ],
)
def test_every_wrong_value_is_refused_by_name(kw: dict[str, object], match: str) -> None:
    values: dict[str, object] = {"targets": ("all",), **kw}
    error = refused(match, **values)
    assert "rollout plan" in error.message or "gate" in error.message


def test_the_refusal_shows_the_value_given() -> None:
    error = refused("got 'ftp'", targets=("all",), via="ftp")
    assert error.to_json()["field"] == "via"


# ---------------------------------------------------------------------- windows


def at_utc(hh: int, mm: int) -> float:
    return float(calendar.timegm((2026, 12, 1, hh, mm, 0, 0, 0, 0)))


def test_a_window_that_wraps_midnight() -> None:
    w = Window.parse("line-2=22:00-04:00")
    assert str(w) == "line-2=22:00-04:00"
    assert w.is_open(at_utc(23, 30)) and w.is_open(at_utc(3, 59)) and w.is_open(at_utc(22, 0))
    assert not w.is_open(at_utc(4, 0)) and not w.is_open(at_utc(12, 0))
    day = Window.parse("a=09:00-17:30")
    assert day.is_open(at_utc(17, 29)) and not day.is_open(at_utc(17, 30))


def test_a_device_starts_only_when_every_window_of_its_groups_is_open() -> None:
    plan = RolloutPlan(targets=("all",), windows=("line-2=22:00-04:00", "line-3=01:00-02:00"))
    assert plan.window_open(["line-1"], at_utc(12, 0))  # no window: always
    assert plan.window_open(["line-2"], at_utc(23, 0))
    assert not plan.window_open(["line-2", "line-3"], at_utc(23, 0))
    assert plan.window_open(["line-2", "line-3"], at_utc(1, 30))
    assert plan.window_open([], time.time())


# ------------------------------------------------------------------------- JSON


def test_json_round_trip_keeps_every_field() -> None:
    plan = RolloutPlan(
        targets=("group:line-1", "press-9"),
        canary="5%",
        rate=5,
        factor=2.5,
        success_threshold=90,
        abort_threshold=20,
        abort_min_finished=4,
        soak_s=0.5,
        device_timeout_s=30,
        gates="p95_ms<=1.2x, error_rate<=0.01,agreement>=0.98",
        allow_no_data=True,
        gate_min_requests=5,
        via="mqtt",
        windows=("line-1=22:00-04:00",),
        trial_window_s=2,
        shadow=True,
    )
    again = RolloutPlan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert [g.text for g in again.gates] == ["p95_ms<=1.2x", "error_rate<=0.01", "agreement>=0.98"]
    assert str(again.canary) == "5%" and again.canary == Count(5, percent=True)


def test_json_with_an_unknown_or_missing_field_is_refused() -> None:
    doc = RolloutPlan(targets=("all",)).to_json()
    with pytest.raises(FleetError, match="only the known fields"):
        RolloutPlan.from_json({**doc, "cannary": "2"})
    with pytest.raises(FleetError, match="canary"):
        RolloutPlan.from_json({**doc, "canary": None})
    with pytest.raises(FleetError, match="a JSON object"):
        RolloutPlan.from_json(["all"])


def test_counts_round_trip_exactly() -> None:
    for text in ("12.5%", "33.333%", "1234567", "100%"):
        count = Count.parse(text, "wave")
        assert str(count) == text and Count.parse(str(count), "wave") == count
