"""ModelHost's request observers: what trial and shadow evaluation see of live traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import InputMismatchError
from tests.agent.test_admission import make_agent
from tests.helpers import SAMPLE_BUNDLE, samples


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str, Any, str | None]] = []

    def observe(self, generation, model, feeds, outputs, error, seconds) -> None:  # type: ignore[no-untyped-def]
        assert seconds >= 0
        self.seen.append((generation, model.manifest.version, outputs, error))


class Broken:
    def observe(self, *args: object) -> None:
        raise RuntimeError("observer bug")


def test_observers_see_answers_and_never_fail_a_request(tmp: Path) -> None:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    recorder = Recorder()
    agent.host.add_observer(Broken())
    agent.host.add_observer(recorder)
    images, labels = samples()
    _, out = agent.host.infer("digits", {"input": images})
    assert (out["logits"].argmax(1) == labels).mean() > 0.9
    [(generation, version, outputs, error)] = recorder.seen
    assert generation == agent.host.generation and version == "1.0.0" and error is None
    assert outputs is out
    # A request refused before it ran is not live traffic the model answered.
    with pytest.raises(InputMismatchError):
        agent.host.infer("digits", {"input": np.zeros((1, 3), np.float32)})
    assert len(recorder.seen) == 1
    agent.host.remove_observer(recorder)
    agent.host.infer("digits", {"input": images})
    assert len(recorder.seen) == 1
    agent.host.close()
