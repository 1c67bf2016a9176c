"""Failing tests of bugs found in the landed parts (issue 8), out of the default run until
fixed (run: `python -m pytest tests/system/update/landing_bugs.py`; rename to
test_bugs.py, or move each test to its module, once fixed).

* h8/core jobs.py: a deploy sent when `update.committed` arrives is refused `update.busy`
  ("job ... is in phase committed"): the final event is emitted before the job thread ends.
* h8/core jobs.py (+ agent/footprint.py): a candidate whose measured footprint alone is over
  the memory cap is swapped *cold* (the served model is closed: requests get 503
  model.not_ready) before it is refused; and its 32-row footprint probe, run in the
  agent process, pushes RSS over the soft limit so live requests are shed (`overloaded`).
"""

from __future__ import annotations

from tests.system.update.flows import deploy
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
