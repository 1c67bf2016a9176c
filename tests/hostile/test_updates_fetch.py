"""Issue 8, Fetch: every hostile HTTP answer, MQTT chunk and need message is refused with
its code, nothing past the signed size reaches the disk, and a transfer fed every
hostile chunk still completes with the right sha256."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.hostile import failures, updates_fetch


def test_hostile_downloads_are_refused_with_their_codes(tmp: Path) -> None:
    outcomes = updates_fetch.run_corpus(tmp / "corpus")
    assert failures(outcomes) == []
    per_class = Counter(o.case.klass for o in outcomes)
    assert set(per_class) == set(updates_fetch.CLASSES)
    assert per_class[updates_fetch.HTTP] >= 50 and per_class[updates_fetch.CHUNK] >= 28
    assert per_class[updates_fetch.NEED] >= 20
    # A refusal is bounded by the read timeout and a couple of retries, never a hang.
    assert max(o.seconds for o in outcomes if o.case.klass == updates_fetch.HTTP) < 60
