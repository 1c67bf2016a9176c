"""EventKind: every kind the agent emits, documented, and which ones re-publish `state`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.events import EventBus
from agent.protocol.events import EventKind
from agent.protocol.update import Phase

DOC = Path(__file__).resolve().parents[3] / "docs" / "mqtt.md"
ROW = re.compile(r"^\| `([a-z_.]+)` \| (yes|no) \|")


def _documented() -> dict[str, bool]:
    text = DOC.read_text()
    table = text.split("<!-- event-kinds:start -->")[1].split("<!-- event-kinds:end -->")[0]
    rows = [ROW.match(line) for line in table.splitlines() if line.startswith("| `")]
    assert all(rows), "a row of the event kinds table does not parse"
    return {m.group(1): m.group(2) == "yes" for m in rows if m}


def test_every_kind_is_documented_and_every_documented_kind_exists() -> None:
    documented = _documented()
    assert set(documented) == {k.value for k in EventKind}


def test_the_documented_state_column_is_the_enums_property() -> None:
    documented = _documented()
    assert {k: k.republishes_state for k in EventKind} == {
        EventKind(k): v for k, v in documented.items()
    }


def test_every_phase_is_an_event_kind() -> None:
    assert {p.event for p in Phase} == {k for k in EventKind if k.value[7:] in set(Phase)}
    for phase in Phase:
        assert isinstance(phase.event, EventKind) and phase.event == f"update.{phase.value}"


def test_kinds_that_change_what_state_shows_re_publish_it() -> None:
    # The bare kinds (no dot) once missed a state update under a prefix rule.
    for kind in (EventKind.OVERLOADED, EventKind.OVERLOAD_CLEARED, EventKind.MODEL_SWAPPED,
                 EventKind.TWIN_DESIRED, *(p.event for p in Phase)):  # fmt: skip
        assert kind.republishes_state, kind
    for kind in (EventKind.COMMAND_REFUSED, EventKind.OUTBOX_DROPPED,
                 EventKind.LINK_SUBSCRIPTION_REFUSED):  # fmt: skip
        assert not kind.republishes_state, kind


def test_parse_keeps_unknown_kinds_out() -> None:
    assert EventKind.parse("model.swapped") is EventKind.MODEL_SWAPPED
    assert EventKind.parse("battery.low") is None
    assert EventKind.parse(3) is None


def test_the_bus_refuses_a_string_that_is_no_kind() -> None:
    bus = EventBus()
    seen: list[EventKind] = []
    bus.subscribe(lambda e: seen.append(e.kind))
    bus.emit(EventKind("overloaded"), "typed from text")
    with pytest.raises(ValueError):
        bus.emit("test.marker", "not a kind")  # type: ignore[arg-type]
    assert seen == [EventKind.OVERLOADED]


def test_mypy_refuses_a_bare_string_kind(tmp: Path) -> None:
    # The point of the enum: `emit("overloaded", ...)` is a type error, caught before run.
    snippet = tmp / "emitter.py"
    snippet.write_text(
        "from agent.events import EventBus\n"
        "from agent.protocol.events import EventKind\n"
        "bus = EventBus()\n"
        'bus.emit(EventKind.OVERLOADED, "typed")\n'
        'bus.emit("overloaded", "bare")\n'
    )
    root = str(Path(__file__).resolve().parents[3])
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull,
         str(snippet)],
        check=False, cwd=tmp, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MYPYPATH": root, "PYTHONPATH": root},
    )  # fmt: skip
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "emitter.py:5:" in errors[0], done.stdout
    assert '"EventKind"' in errors[0]
