"""Hostile load (issue 7, sections 2-3): every case refused with its code, RSS under
the cap throughout, and the agent serves again afterwards."""

from __future__ import annotations

from pathlib import Path

from tests.hostile import failures
from tests.hostile.load import CAP_MB, CLASSES, run_corpus


def test_load_corpus_is_refused_under_the_cap_and_the_agent_recovers(tmp: Path) -> None:
    outcomes = run_corpus(tmp / "load")
    assert failures(outcomes) == []
    assert {o.case.klass for o in outcomes} == set(CLASSES)
    names = [o.case.name for o in outcomes]
    assert "concurrent_bursts" in names and "golden_replay_bomb" in names
    for outcome in outcomes:
        if outcome.case.klass == "memory.load":
            assert outcome.peak_rss_mb is not None
            assert outcome.peak_rss_mb < CAP_MB, outcome
        else:
            # The lying bundles were judged before their golden replay ran.
            assert outcome.extra["grew_mb"] < 100, outcome
