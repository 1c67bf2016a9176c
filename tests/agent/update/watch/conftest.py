"""Fixtures of the watchdog tests: an agent serving the sample, live traffic, candidates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.service import Agent
from tests.agent.test_admission import make_agent
from tests.agent.update.watch.candidates import digits
from tests.helpers import SAMPLE_BUNDLE

# Live traffic of this device: digits 0-4 only, so a candidate that answers other
# classes moves the top-1 mix (a permutation of a uniform mix would not).
LIVE_CLASSES = (0, 1, 2, 3, 4)


@pytest.fixture(scope="session")
def live_images() -> np.ndarray:
    return digits(LIVE_CLASSES)


@pytest.fixture
def agent(tmp: Path) -> Iterator[Agent]:
    agent = make_agent(tmp)
    agent.admission.install(SAMPLE_BUNDLE)
    try:
        yield agent
    finally:
        agent.host.close()
