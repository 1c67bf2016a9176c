"""Issue 8: every hostile release index or twin value is refused with its code, moves no
counter, and deploys nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.hostile import failures, updates_index


def test_hostile_release_indexes_are_refused_and_nothing_is_deployed(tmp_path: Path) -> None:
    outcomes = updates_index.run_corpus(tmp_path)
    assert failures(outcomes) == []
    per_class = Counter(o.case.klass for o in outcomes)
    assert set(per_class) == set(updates_index.CLASSES)
    assert sum(per_class.values()) >= 200
    # Both runs took part: the guard on its own and the whole pull path over HTTP.
    names = {o.case.name for o in outcomes}
    assert (
        sum(n.startswith("guard-") for n in names) == sum(n.startswith("pull-") for n in names) - 2
    )
