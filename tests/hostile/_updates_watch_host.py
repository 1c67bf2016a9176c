"""The served sample model for the watchdog corpus: a real agent's ModelHost, made once."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

from agent.config.loader import parse_config
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE


@functools.cache
def served_model() -> tuple[Any, Any]:
    from agent.service import Agent

    tmp = Path(tempfile.mkdtemp(prefix="er-hwatch-", dir="/tmp"))
    config = parse_config(
        {
            "state_dir": str(tmp / "state"),
            "trust": {"public_keys": [str(DEMO_PUB)]},
            "api": {"socket": str(tmp / "api.sock")},
        },
        {},
    )
    agent = Agent(config)
    agent.admission.install(SAMPLE_BUNDLE)
    return agent.host, agent.host.model
