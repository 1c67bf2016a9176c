"""Failing tests of bugs found in the landed parts (issue 8), out of the default run until
fixed (run: `python -m pytest tests/system/update/landing_bugs.py`; rename to
test_bugs.py, or move each test to its module, once fixed).

* h8/core jobs.py: a deploy sent when `update.committed` arrives is refused `update.busy`
  ("job ... is in phase committed"): the final event is emitted before the job thread ends.
* h8/core jobs.py (+ agent/footprint.py): a candidate whose measured footprint alone is over
  the memory cap is swapped *cold* (the served model is closed: requests get 503
  model.not_ready) before it is refused; and its 32-row footprint probe, run in the
  agent process, pushes RSS over the soft limit so live requests are shed (`overloaded`).
* h8/index poll.py: the first poll runs before the initial model is loaded, so every start
  with `update.repository` emits `update.pull_refused` "no model is served".
"""

from __future__ import annotations

import time
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.system.update.flows import deploy
from tests.system.update.test_index import _index, _pull_agent
from tests.system.update.test_refusals import Case, check_refusal, too_big
from tests.update_rig import Bundles, Rig


def test_a_candidate_whose_probe_exceeds_the_cap_is_refused_without_failing_requests(
    rig: Rig, bundles: Bundles
) -> None:
    check_refusal(rig, bundles, Case("too_big_for_the_cap", too_big, "update.validation_failed",
                                     agent="[memory]\nmax_mb = 300\n"))  # fmt: skip


def test_a_deploy_sent_on_the_committed_event_is_accepted(rig: Rig, bundles: Bundles) -> None:
    """A console that sees `update.committed` (a final phase) may send the next deploy."""
    rig.start_agent()
    for i in range(30):
        version = f"1.1.{i}"
        release = bundles.good(version)
        url = rig.server.add(f"/n{i}", release.data)
        reply, final = deploy(rig, release.deploy_args(url, trial={"window_s": 0}))
        assert reply["ok"], (version, reply)
        assert final is not None and final["kind"] == "update.committed", final


def test_start_with_a_repository_reports_no_spurious_refusal(
    rig: Rig, bundles: Bundles, demo_key: Ed25519PrivateKey
) -> None:
    """The first poll must wait for the model served at start: a device that serves 1.0.0
    must not say "no model is served" on every start."""
    rig.server.add("/a", bundles.good("1.0.0").data)
    rig.server.add("/index.json", _index(rig, demo_key, 9, timedelta(hours=1), [("1.0.0", "/a")]))
    _pull_agent(rig)
    deadline = time.monotonic() + 60
    while len(rig.server.requests("/index.json")) < 3:  # a few polls
        assert time.monotonic() < deadline
        time.sleep(0.05)
    refusals = [e for e in rig.console.events() if e["kind"] == "update.pull_refused"]
    assert refusals == [], refusals
