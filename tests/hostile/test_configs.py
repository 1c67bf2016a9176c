"""The hostile-config corpus: every case refused with its code, nothing damaged."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.helpers import base_config, running_agent
from tests.hostile import failures
from tests.hostile.configs import CHECK, RUN, run_corpus, run_state_dirs


def test_every_hostile_config_is_refused_clearly_and_the_device_is_unharmed(tmp: Path) -> None:
    outcomes = run_corpus(tmp / "corpus")
    assert failures(outcomes) == []
    per_class = Counter(o.case.klass for o in outcomes)
    assert per_class[CHECK] >= 100 and per_class[RUN] >= 15, per_class
    # Every section of the model had at least one wrong value.
    sections = {o.case.name.split(".")[0].removeprefix("env ") for o in outcomes}
    for section in ("memory", "api", "mqtt", "runtimes", "outbox", "commands", "kubeedge"):
        assert section in sections, sections
    # Refusing a config reads it and stops: no judge grew past a small process.
    assert max(o.peak_rss_mb or 0 for o in outcomes) < 200, max(
        o.peak_rss_mb or 0 for o in outcomes
    )
    # run_corpus checked that every state dir a refused `run` met kept its `current`;
    # one of them still serves its model, and its lock is free again.
    states = run_state_dirs(tmp / "corpus")
    assert len(states) >= 10
    text = base_config(tmp, bundle=None).replace(str(tmp / "state"), str(states[0]))
    with running_agent(tmp, text) as agent, agent.client() as c:
        assert c.get_json("/v2/models/digits")["versions"] == ["1.0.0"]
