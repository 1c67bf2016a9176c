"""kill -9 of the agent at each phase of a job, then restart: a verified model serves,
and the journal's next step is taken (resume / discard / roll back).

The kill happens as soon as STATE/update.json names the phase; the phase persisted at
the moment of death is read back after the kill (that is what recovery sees), and the
outcome after restart is checked against it. Downloading and trial are held long (a slow
server, a long window) so they are hit for sure; the quick phases are hit when the
journal shows them first (the phase that was hit is asserted to be the target or later).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.update.flows import FINAL, QUICK_TRIAL, after_final
from tests.update_rig import Bundles, Load, Rig, served_version

ORDER = ["accepted", "downloading", "verifying", "validating", "shadow", "swapping", "trial"]


def _phase(rig: Rig) -> str | None:
    try:
        data: dict[str, Any] | None = rig.journal()
    except (ValueError, OSError):
        return None  # mid-rename: try again
    job = (data or {}).get("job") or {}
    return job.get("phase")


def _partials(rig: Rig) -> list[Path]:
    incoming = rig.state_dir / "incoming"
    return [p for p in incoming.glob("*") if p.is_file()] if incoming.exists() else []


@pytest.mark.parametrize("target", ["downloading", "verifying", "validating", "swapping", "trial"])
def test_kill_9_at_each_phase_then_restart(rig: Rig, bundles: Bundles, target: str) -> None:
    rig.start_agent()
    release = bundles.good("1.1.0")
    slow = target == "downloading"
    url = rig.server.add("/b", release.data, delay_s=0.2 if slow else 0.0, chunk=8192)
    trial = {"window_s": 120, "min_requests": 0} if target == "trial" else QUICK_TRIAL
    reply = rig.console.deploy(release.deploy_args(url, trial=trial))
    assert reply["ok"], reply
    deadline = time.monotonic() + 120
    while True:
        phase = _phase(rig)
        if phase is not None and phase in ORDER and ORDER.index(phase) >= ORDER.index(target):
            break
        if phase in {f.removeprefix("update.") for f in FINAL}:
            pytest.fail(f"job ended ({phase}) before {target} was seen: {rig.journal()}")
        assert time.monotonic() < deadline, f"{target} never reached: {rig.journal()}"
        time.sleep(0.002)
    if target == "downloading":
        # Die with some bytes on disk, so there is something to resume.
        while not any(p.stat().st_size >= 16384 for p in _partials(rig)):
            assert time.monotonic() < deadline, f"no partial download: {rig.journal()}"
            time.sleep(0.005)
    rig.kill_agent()
    died_in = _phase(rig)
    assert died_in in ORDER, rig.journal()
    if target in ("downloading", "trial"):
        assert died_in == target, rig.journal()
    print(f"target {target}: died in {died_in}")
    # Restart on the same state directory; serve the old version or the new, never none.
    after = rig.console.last_seq()
    agent = rig.start_agent()
    with Load(agent.socket, clients=2) as load:
        load.wait_requests(20)
        final = rig.console.wait_event(FINAL, 240, after=after)
        load.wait_requests(20)
    assert load.report.failures == 0, load.report.failed
    version = served_version(agent)
    if died_in in ("accepted", "downloading"):
        # Interrupted download: resumed from the partial file with Range, then committed.
        assert final["kind"] == "update.committed", final
        assert version == "1.1.0"
        ranges = [q.range for q in rig.server.requests("/b")]
        assert any(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges), ranges
    elif died_in in ("verifying", "validating", "shadow"):
        # Interrupted validation: discarded; the old model never stopped.
        assert final["kind"] == "update.failed", final
        assert version == "1.0.0"
    elif died_in == "swapping":
        # Mid-swap: either the candidate was not yet current (failed, unchanged) or it was
        # (rolled back); the old model serves either way.
        assert final["kind"] in ("update.failed", "update.rolled_back"), final
        assert version == "1.0.0"
    else:
        # Died in the trial: rolled back to the old model.
        assert final["kind"] == "update.rolled_back", final
        assert version == "1.0.0"
    journal = rig.journal()
    assert journal is not None and journal["job"]["phase"] == final["kind"].removeprefix(
        "update."
    ), json.dumps(journal)
    # The retained state agrees with what is served.
    rig.console.wait_state(lambda s: s.get("model", {}).get("version") == version)


def _kill_in_trial(rig: Rig, args: dict[str, Any]) -> None:
    reply = rig.console.deploy(args)
    assert reply["ok"], reply
    deadline = time.monotonic() + 120
    while _phase(rig) != "trial":
        assert time.monotonic() < deadline, rig.journal()
        time.sleep(0.005)
    rig.kill_agent()


def test_a_candidate_the_agent_dies_with_is_marked_bad_at_max_crashes(
    rig: Rig, bundles: Bundles
) -> None:
    rig.start_agent()
    release = bundles.good("1.1.0")
    url = rig.server.add("/b", release.data)
    trial = {"window_s": 120, "min_requests": 0, "max_crashes": 1}
    _kill_in_trial(rig, release.deploy_args(url, trial=trial))
    after = rig.console.last_seq()
    agent = rig.start_agent()
    final = rig.console.wait_event(FINAL, 120, after=after)
    assert final["kind"] == "update.rolled_back", final
    assert final["data"].get("code") == "update.crash_loop", final
    assert served_version(agent) == "1.0.0"
    again = after_final(rig, "deploy", release.deploy_args(url, trial=trial))
    assert not again["ok"] and again["error"]["code"] == "update.marked_bad", again


def test_one_crash_under_max_crashes_rolls_back_without_marking_bad(
    rig: Rig, bundles: Bundles
) -> None:
    rig.start_agent()
    release = bundles.good("1.1.0")
    url = rig.server.add("/b", release.data)
    _kill_in_trial(rig, release.deploy_args(url, trial={"window_s": 120, "min_requests": 0,
                                                         "max_crashes": 2}))  # fmt: skip
    after = rig.console.last_seq()
    agent = rig.start_agent()
    final = rig.console.wait_event(FINAL, 120, after=after)
    assert final["kind"] == "update.rolled_back", final
    assert final["data"].get("code") == "update.interrupted", final
    assert served_version(agent) == "1.0.0"
    # Not marked bad: the same version may be deployed again, and commits.
    rolled = final["seq"]
    reply = after_final(rig, "deploy", release.deploy_args(url, trial=QUICK_TRIAL))
    assert reply["ok"], reply
    final = rig.console.wait_event({"update.committed", "update.failed"}, 120, after=rolled)
    assert final["kind"] == "update.committed", final
