"""The hostile-request corpus against a real agent: every case refused with its code,
no 500 for a client error, and the agent still serves its model afterwards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import psutil

from tests.helpers import base_config, running_agent, samples
from tests.hostile import failures
from tests.hostile.requests import CLASSES, SOFT_LIMIT_MB, cases, corpus_agent, run_cases, siege


def test_corpus_is_large_and_covers_every_class() -> None:
    generated = cases()
    per_class = Counter(rc.case.klass for rc in generated)
    assert len(generated) >= 60, len(generated)
    assert set(per_class) == set(CLASSES), per_class
    names = [f"{rc.case.klass}/{rc.case.name}" for rc in generated]
    assert len(names) == len(set(names))


def test_every_hostile_request_is_refused_and_the_agent_keeps_serving(tmp_path: Path) -> None:
    with corpus_agent(tmp_path) as agent:
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


def test_slow_clients_and_an_fd_limit_do_not_silence_the_api(tmp: Path) -> None:
    """Issue 7 section 4: 64 slow clients and a descriptor limit below what they need."""
    config = base_config(tmp, api="head_timeout_s = 2")
    with running_agent(tmp, config) as agent:
        process = psutil.Process(agent.proc.pid)
        limit = process.num_fds() + 40  # fewer spare descriptors than slow clients
        result = siege(
            agent, slow=64, fd_limit=limit, seconds=90, reconnect=False, until_served=True
        )
        # The good client got in once the head deadline cut the slow ones.
        assert result.served >= 1, (result, agent.output()[-3000:])
        assert result.slow_cut >= 40, result
        log = agent.output()
        assert "API accept failed (Too many open files)" in log  # EMFILE really happened
        # ... and after it, the agent serves its model (the accept loop survived).
        images, labels = samples()
        with agent.client() as client:
            out = client.infer("digits", {"input": images})
        assert (out["logits"].argmax(1) == labels).mean() >= 0.9
        assert process.num_threads() < 64 + 30
