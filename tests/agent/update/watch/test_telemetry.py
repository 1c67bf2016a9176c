"""The watchdog's figures in telemetry (model.live, model.shadow), not in the retained state."""

from __future__ import annotations

import threading

import numpy as np

from agent.link.telemetry import model_figures
from agent.protocol.update import ShadowSpec
from agent.service import Agent
from agent.update.shadow import ShadowEvaluator
from agent.update.trial import Watchdog


def test_live_and_shadow_figures_go_into_telemetry_only(agent: Agent) -> None:
    # As the agent wires them: its recorder (started with the agent) behind the
    # update service's trial port, and its shadow runner.
    recorder = agent.traffic
    recorder.start()
    assert isinstance(agent.updates.trial, Watchdog) and agent.updates.trial.recorder is recorder
    shadow = agent.updates.shadow
    assert isinstance(shadow, ShadowEvaluator)
    try:
        assert "live" not in (model_figures(agent, live=True) or {})  # nothing answered yet
        images = np.zeros((3, 1, 8, 8), np.float32)
        for _ in range(4):
            agent.host.infer("digits", {"input": images})
        model = agent.host.model
        assert model is not None
        verdict = shadow.evaluate(
            model, ShadowSpec(timeout_s=1, min_requests=1), threading.Event(), lambda f: None
        )
        assert not verdict.ok  # no traffic during it: timed out
        figures = model_figures(agent, live=True)
        assert figures is not None
        assert figures["live"]["requests"] == 4 and figures["live"]["top1_samples"] == 12
        assert "p95_ms" in figures["live"]
        assert figures["shadow"]["compared"] == 0 and figures["shadow"]["sample"] == 0.2
        # The retained state's figures: who serves and on what, nothing that moves.
        assert set(model_figures(agent) or {}) == {
            "name",
            "version",
            "sha256",
            "runtime",
            "providers",
            "variant",
            "variant_reason",
        }
    finally:
        recorder.stop()
