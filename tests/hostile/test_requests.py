"""The hostile-request corpus against a real agent: every case refused with its code,
no 500 for a client error, and the agent still serves its model afterwards."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import psutil

from tests.helpers import samples
from tests.hostile import failures
from tests.hostile.requests import CLASSES, SOFT_LIMIT_MB, cases, corpus_agent, run_cases


def test_corpus_is_large_and_covers_every_class() -> None:
    generated = cases()
    per_class = Counter(rc.case.klass for rc in generated)
    assert len(generated) >= 60, len(generated)
    assert set(per_class) == set(CLASSES), per_class
    names = [f"{rc.case.klass}/{rc.case.name}" for rc in generated]
    assert len(names) == len(set(names))


def test_every_hostile_request_is_refused_and_the_agent_keeps_serving() -> None:
    # A short path: the agent's Unix socket path must fit in sun_path.
    workdir = Path(tempfile.mkdtemp(prefix="er-hreq-", dir="/tmp"))
    with corpus_agent(workdir) as agent:
        outcomes = run_cases(agent)
        assert failures(outcomes) == []
        assert agent.proc.poll() is None
        images, labels = samples()
        with agent.client() as client:
            out = client.infer("digits", {"input": images})
            assert (out["logits"].argmax(1) == labels).mean() >= 0.9
            status = client.get_json("/v2/edgerun/status")
        assert status["model"]["version"] == "1.0.0"
        # No body announced over the headroom was read: RSS never neared the soft limit.
        peak = max(o.peak_rss_mb or 0.0 for o in outcomes)
        assert peak < SOFT_LIMIT_MB * 0.8, peak
        assert psutil.Process(agent.proc.pid).num_threads() < 40
        assert "Traceback" not in agent.output()
