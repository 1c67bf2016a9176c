"""Issue 8: every hostile deploy/rollback/update.* command is refused with its code in
the reply (or, accepted, its job fails with its code) and the device keeps serving."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.hostile import failures, updates_core


def test_hostile_update_commands_are_refused_and_the_model_keeps_serving(
    tmp_path: Path,
) -> None:
    outcomes = updates_core.run_corpus(tmp_path)
    assert failures(outcomes) == []
    per_class = Counter(o.case.klass for o in outcomes)
    assert set(per_class) == set(updates_core.CLASSES)
    assert sum(per_class.values()) >= 90
