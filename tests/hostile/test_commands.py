"""Issue 7, section 6: every hostile command is refused with its code, answered only on
a console reply topic (or nowhere), and the device keeps serving."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.hostile import commands, failures


def test_hostile_commands_are_refused_and_nothing_leaks(tmp_path: Path) -> None:
    outcomes = commands.run_corpus(tmp_path)
    assert failures(outcomes) == []
    per_class = Counter(o.case.klass for o in outcomes)
    assert set(per_class) == set(commands.CLASSES)
    assert sum(per_class.values()) >= 55
    # Both runs took part: the in-process dispatcher and the real agent behind mosquitto.
    names = {o.case.name for o in outcomes}
    assert "broker-nothing-published-outside-reply-topics" in names
    assert sum(n.startswith("broker-") for n in names) >= 20
    # Bounded memory: the agent process grew by less than 64 MB over all the broker
    # cases (the oversized and the deeply nested ones included).
    agent_rss = [o.peak_rss_mb for o in outcomes if o.case.name.startswith("broker-")]
    measured = [rss for rss in agent_rss if rss is not None]
    assert measured and max(measured) - min(measured) < 64, measured
