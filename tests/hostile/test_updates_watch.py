"""The watchdog corpus: hostile candidate answers never crash the trial observer or the
shadow comparison, and each is classified as it must be."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.hostile import failures
from tests.hostile.updates_watch import CLASSES, cases, run_corpus


def test_corpus_covers_every_class() -> None:
    per_class = Counter(c.klass for c, _, _, _ in cases())
    assert set(per_class) == set(CLASSES) and min(per_class.values()) >= 40, per_class
    names = [(c.klass, c.name) for c, _, _, _ in cases()]
    assert len(names) == len(set(names))


def test_every_hostile_answer_is_classified(tmp_path: Path) -> None:
    outcomes = run_corpus(tmp_path)
    assert failures(outcomes) == []
    codes = Counter(o.code for o in outcomes)
    # Both sides of each class occur: the corpus is not all one verdict.
    assert {"watch.bad_answer", "watch.counted", "watch.agree", "watch.disagree"} <= set(codes)
