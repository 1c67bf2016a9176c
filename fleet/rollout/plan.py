"""The rollout plan: what to update, in which waves, and what must hold for it to go on.

A `RolloutPlan` is frozen and checks itself when built: every wrong value is refused
with FleetError(console.bad_input) naming the field, the value and what is allowed.
It is recorded whole (JSON) in ROLLOUT_CREATED, so a console that resumes a rollout
drives it with exactly the plan it was started with.

Waves (`waves(devices)`): device ids sorted, the canary first, then either fixed
waves (`wave`: N devices or N% of the targets each) or exponential ones (`rate`
devices, then rate x factor, x factor^2 ... as AWS IoT jobs' exponential rollout).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from agent.names import shown
from agent.protocol.topics import TopicError, device_id, group_name
from fleet.errors import FleetCode, FleetError
from fleet.rollout.gates import Gate, parse_gates

Via = Literal["http", "mqtt"]
MAX_WAVES = 10_000  # a plan that makes more waves than this is a typo (rate 1 factor 1)


def bad(field_name: str, allowed: str, value: object = None) -> FleetError:
    got = "" if value is None else f", got {shown(value)}"
    return FleetError(
        FleetCode.BAD_INPUT, f"rollout plan: {field_name} must be {allowed}{got}", field=field_name
    )


@dataclass(frozen=True, slots=True)
class Count:
    """`N` devices or `N%` of the targets (rounded up: a share is never zero devices)."""

    value: float
    percent: bool = False

    @classmethod
    def parse(cls, text: object, what: str) -> Count:
        if isinstance(text, Count):
            return text
        if isinstance(text, bool) or not isinstance(text, str | int):
            raise bad(what, 'a number of devices "N" or a share "N%"', text)
        raw = str(text).strip()
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(%?)", raw)
        if m is None:
            raise bad(what, 'a number of devices "N" or a share "N%" (e.g. 2 or 5%)', text)
        value, percent = float(m.group(1)), m.group(2) == "%"
        if percent and not 0 < value <= 100:
            raise bad(what, "a share above 0% and at most 100%", text)
        if not percent and (value < 1 or value != int(value)):
            raise bad(what, "a whole number of devices, 1 or more", text)
        return cls(value, percent)

    def of(self, total: int) -> int:
        if total <= 0:
            return 0
        if self.percent:
            # 1% of 50 devices is one device, not none; float noise (0.1*300) must not add one.
            return max(1, min(total, math.ceil(round(total * self.value / 100, 9))))
        return min(total, int(self.value))

    def __str__(self) -> str:
        v = float(self.value)
        number = str(int(v)) if v.is_integer() else repr(v)  # exact: parsed back from JSON
        return f"{number}%" if self.percent else number


@dataclass(frozen=True, slots=True)
class Window:
    """A daily maintenance window of a group, UTC, in minutes after midnight; it may wrap
    midnight (22:00-04:00). Devices of that group start an update only inside it."""

    group: str
    start_min: int
    end_min: int

    @classmethod
    def parse(cls, text: object) -> Window:
        if not isinstance(text, str):
            raise bad("window", 'GROUP=HH:MM-HH:MM (UTC), e.g. "line-2=22:00-04:00"', text)
        m = re.fullmatch(r"([^=\s]+)=([0-9]{1,2}):([0-9]{2})-([0-9]{1,2}):([0-9]{2})", text.strip())
        if m is None:
            raise bad("window", 'GROUP=HH:MM-HH:MM (UTC), e.g. "line-2=22:00-04:00"', text)
        group = m.group(1)
        try:
            group_name(group)
        except TopicError:
            raise bad("window", "a group name of 1-64 of A-Za-z0-9._- before '='", text) from None
        h1, m1, h2, m2 = (int(m.group(i)) for i in range(2, 6))
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise bad("window", "times from 00:00 to 23:59", text)
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise bad(
                "window", "a start and an end that differ (an empty window never opens)", text
            )
        return cls(group, start, end)

    def is_open(self, now: float) -> bool:
        minute = int(now // 60) % (24 * 60)
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min  # wraps midnight

    def __str__(self) -> str:
        def hm(x: int) -> str:
            return f"{x // 60:02d}:{x % 60:02d}"

        return f"{self.group}={hm(self.start_min)}-{hm(self.end_min)}"


def _target(text: object) -> str:
    if not isinstance(text, str):
        raise bad("to", 'a device id, "group:NAME" or "all"', text)
    if text == "all":
        return text
    try:
        if text.startswith("group:"):
            group_name(text[len("group:") :])
        else:
            device_id(text)
    except TopicError as exc:
        raise bad("to", f'a device id, "group:NAME" or "all" ({exc})', text) from None
    return text


def _number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, f"a number from {low:g} to {high:g}", value)
    if not (math.isfinite(value) and low <= value <= high):
        raise bad(name, f"a number from {low:g} to {high:g}", value)
    return float(value)


@dataclass(frozen=True)
class RolloutPlan:
    targets: tuple[str, ...]
    canary: Count = Count(1.0)
    wave: Count | None = None  # fixed waves; None with `rate`, else 25%
    rate: int | None = None  # exponential: first wave after the canary
    factor: float = 2.0
    success_threshold: float = 100.0  # % of a wave's reached devices that must succeed
    abort_threshold: float | None = None  # % failed of finished devices that halts
    abort_min_finished: int = 1  # ... once at least this many finished
    soak_s: float = 60.0  # after a wave's last outcome, before its gates
    device_timeout_s: float = 600.0  # started, no final phase by then: timed_out (failed)
    gates: tuple[Gate, ...] = ()
    allow_no_data: bool = False  # a gate without figures passes (said in its result)
    gate_min_requests: int = 10  # fewer live requests on the new model: no data
    via: Via = "http"
    windows: tuple[Window, ...] = ()
    trial_window_s: float | None = None  # passed to the device's trial (DeployRequest)
    shadow: bool = False  # the device shadow-evaluates first (DeployRequest)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) or not isinstance(self.targets, tuple | list):
            raise bad("to", 'a list of device ids, "group:NAME" or "all"', self.targets)
        if not self.targets:
            raise bad("to", 'at least one device id, "group:NAME" or "all"')
        object.__setattr__(self, "targets", tuple(_target(t) for t in self.targets))
        object.__setattr__(self, "canary", Count.parse(self.canary, "canary"))
        if self.wave is not None and self.rate is not None:
            raise bad("wave", "given alone: fixed waves (--wave) or exponential (--rate/--factor)")
        if self.wave is not None:
            object.__setattr__(self, "wave", Count.parse(self.wave, "wave"))
        if self.rate is not None:
            if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 1:
                raise bad("rate", "a whole number of devices, 1 or more", self.rate)
            object.__setattr__(self, "factor", _number("factor", self.factor, 1.0, 100.0))
        elif self.factor != 2.0:
            raise bad("factor", "given only with --rate", self.factor)
        for name, low, high in (
            ("success_threshold", 0.0, 100.0),
            ("soak_s", 0.0, 7 * 86_400.0),
            ("device_timeout_s", 0.1, 7 * 86_400.0),
        ):
            object.__setattr__(self, name, _number(name, getattr(self, name), low, high))
        if self.abort_threshold is not None:
            object.__setattr__(
                self,
                "abort_threshold",
                _number("abort_threshold", self.abort_threshold, 0.0, 100.0),
            )
        for name in ("abort_min_finished", "gate_min_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, "a whole number, 0 or more", value)
        if self.via not in ("http", "mqtt"):
            raise bad("via", '"http" or "mqtt"', self.via)
        gates = self.gates
        if isinstance(gates, str):
            gates = parse_gates(gates)
        if not all(isinstance(g, Gate) for g in gates):
            raise bad("gates", "gates parsed by fleet.rollout.gates", gates)
        object.__setattr__(self, "gates", tuple(gates))
        windows = tuple(w if isinstance(w, Window) else Window.parse(w) for w in self.windows)
        groups = [w.group for w in windows]
        if len(set(groups)) != len(groups):
            raise bad("window", "one window per group", ", ".join(str(w) for w in windows))
        object.__setattr__(self, "windows", windows)
        if self.trial_window_s is not None:
            object.__setattr__(
                self, "trial_window_s", _number("trial_window_s", self.trial_window_s, 0, 86_400)
            )
        if not isinstance(self.shadow, bool):
            raise bad("shadow", "true or false", self.shadow)
        if not isinstance(self.allow_no_data, bool):
            raise bad("allow_no_data", "true or false", self.allow_no_data)

    # ------------------------------------------------------------------ waves

    def wave_sizes(self, total: int) -> list[int]:
        """How many devices each wave takes, the canary first; sums to `total`."""
        if total <= 0:
            return []
        sizes = [self.canary.of(total)]
        left = total - sizes[0]
        step = 0
        while left > 0:
            if self.rate is not None:
                size = max(1, int(self.rate * self.factor**step))
            else:
                size = (self.wave or Count(25, percent=True)).of(total)
            size = min(size, left)
            sizes.append(size)
            left -= size
            step += 1
            if len(sizes) > MAX_WAVES:
                raise bad("wave", f"a plan of at most {MAX_WAVES} waves", len(sizes))
        return sizes

    def waves(self, devices: Iterable[str]) -> list[list[str]]:
        """The devices in waves: sorted ids (deterministic: the same on every console),
        the canary first."""
        ordered = sorted(set(devices))
        out: list[list[str]] = []
        at = 0
        for size in self.wave_sizes(len(ordered)):
            out.append(ordered[at : at + size])
            at += size
        return out

    def window_open(self, groups: Sequence[str], now: float) -> bool:
        """A device may start now when every window of its groups is open."""
        return all(w.is_open(now) for w in self.windows if w.group in groups)

    # ------------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "canary": str(self.canary),
            "wave": None if self.wave is None else str(self.wave),
            "rate": self.rate,
            "factor": self.factor,
            "success_threshold": self.success_threshold,
            "abort_threshold": self.abort_threshold,
            "abort_min_finished": self.abort_min_finished,
            "soak_s": self.soak_s,
            "device_timeout_s": self.device_timeout_s,
            "gates": [g.text for g in self.gates],
            "allow_no_data": self.allow_no_data,
            "gate_min_requests": self.gate_min_requests,
            "via": self.via,
            "windows": [str(w) for w in self.windows],
            "trial_window_s": self.trial_window_s,
            "shadow": self.shadow,
        }

    @classmethod
    def from_json(cls, doc: object) -> RolloutPlan:
        if not isinstance(doc, Mapping):
            raise bad("plan", "a JSON object", doc)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise bad("plan", f"only the known fields ({', '.join(sorted(known))})", unknown)
        values = dict(doc)
        if "targets" in values and isinstance(values["targets"], list):
            values["targets"] = tuple(values["targets"])
        if "gates" in values:
            gates = values["gates"]
            if not isinstance(gates, list) or not all(isinstance(g, str) for g in gates):
                raise bad("gates", "a list of gate strings", gates)
            values["gates"] = tuple(g for text in gates for g in parse_gates(text))
        if "windows" in values:
            if not isinstance(values["windows"], list):
                raise bad("windows", "a list of GROUP=HH:MM-HH:MM", values["windows"])
            values["windows"] = tuple(values["windows"])
        for name in ("canary", "wave"):
            if values.get(name) is not None:
                values[name] = Count.parse(values[name], name)
        if "canary" in values and values["canary"] is None:
            raise bad("canary", 'a number of devices "N" or a share "N%"', None)
        return cls(**values)
