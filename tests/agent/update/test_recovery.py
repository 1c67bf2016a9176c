"""The recovery table: each phase's journal as a crash leaves it, then a start."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.update import Phase
from agent.update.errors import UpdateCode
from agent.update.journal import JobRecord, Journal
from tests.agent.update.support import make_agent, request_for, served, sha256, started
from tests.helpers import SampleParts, make_bundle


def crashed_in(state: Path, phase: Phase, bundle: Path, version: str, **extra: object) -> None:
    """Write the journal a SIGKILL during `phase` leaves behind."""
    now = time.time()
    Journal(state).record(
        JobRecord(
            id="dead0000beef0000",
            kind="deploy",
            phase=phase,
            request=request_for(bundle, version, **extra).to_args(),  # type: ignore[arg-type]
            version=version,
            started=now,
            phase_started=now,
            candidate_sha=sha256(bundle),
            candidate_dir=str(state / "bundles" / sha256(bundle)),
            previous_version="1.0.0",
        )
    )


def job_of(state: Path) -> dict[str, object]:
    data = json.loads((state / "update.json").read_text())
    job: dict[str, object] = data["job"]
    return job


@pytest.mark.parametrize("phase", [Phase.VERIFYING, Phase.VALIDATING, Phase.SHADOW])
def test_died_before_the_swap_discards_the_candidate(
    phase: Phase, sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    state = agent.config.state_dir
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    # The candidate as the killed agent left it: unpacked but never linked, a download.
    agent.store.install(bundle, agent.keys, agent_limits(agent))
    (state / "incoming").mkdir(exist_ok=True)
    (state / "incoming" / f"{sha256(bundle)}.part").write_bytes(b"x" * 100)
    crashed_in(state, phase, bundle, "1.1.0")
    again = make_agent(tmp)
    again.recover_and_serve()
    assert again.recovered.action == "discarded"
    assert served(again) == "1.0.0"
    job = job_of(state)
    assert job["phase"] == "failed" and job["code"] == UpdateCode.INTERRUPTED
    assert phase.value in str(job["reason"])
    assert not (state / "bundles" / sha256(bundle)).exists()
    assert list((state / "incoming").iterdir()) == []


def agent_limits(agent):  # type: ignore[no-untyped-def]
    from agent.admission import limits_from

    return limits_from(agent.config)


def test_died_downloading_resumes_from_the_partial_file(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    state = agent.config.state_dir
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    (state / "incoming").mkdir(exist_ok=True)
    partial = state / "incoming" / f"{sha256(bundle)}.part"
    partial.write_bytes(bundle.read_bytes()[:1000])
    stale = state / "incoming" / f"{'0' * 64}.part"
    stale.write_bytes(b"old")
    crashed_in(state, Phase.DOWNLOADING, bundle, "1.1.0")
    again = started(tmp)
    assert again.recovered.action == "resume"
    assert partial.exists() and not stale.exists()  # the job's partial stays, others go
    assert served(again) == "1.0.0"
    resume = again.recovered.resume
    assert resume is not None and again.updates.resume(resume)
    assert again.updates.join(120)
    job = again.updates.status()["job"]
    assert job["id"] == "dead0000beef0000" and job["phase"] == "committed", job
    assert served(again) == "1.1.0"


def test_died_in_trial_rolls_back_and_a_crash_loop_marks_it_bad(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    state = agent.config.state_dir
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    agent.updates.deploy(request_for(bundle, "1.1.0"))
    assert agent.updates.join(120) and served(agent) == "1.1.0"
    # current = 1.1.0, previous = 1.0.0: exactly what a kill during the trial leaves.
    for crash in (1, 2):
        crashed_in(state, Phase.TRIAL, bundle, "1.1.0", trial={"max_crashes": 2})
        again = make_agent(tmp)
        again.recover_and_serve()
        assert again.recovered.action == "rolled_back"
        assert served(again) == "1.0.0"
        job = job_of(state)
        assert job["phase"] == "rolled_back"
        assert job["code"] == (UpdateCode.CRASH_LOOP if crash == 2 else UpdateCode.INTERRUPTED)
        assert Journal(state).state.crashes[sha256(bundle)] == crash
        assert (Journal(state).is_bad("1.1.0") is not None) == (crash == 2)
        # Put the candidate back as current for the next crash.
        again.store.rollback()
    assert again.store.manifest(again.store.current()).version == "1.1.0"  # type: ignore[arg-type]


def test_died_swapping_before_the_links_moved_keeps_current(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    state = agent.config.state_dir
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    crashed_in(state, Phase.SWAPPING, bundle, "1.1.0")
    again = make_agent(tmp)
    again.recover_and_serve()
    assert again.recovered.action == "failed" and served(again) == "1.0.0"
    assert job_of(state)["code"] == UpdateCode.INTERRUPTED


def test_final_phases_need_nothing_and_a_torn_journal_is_set_aside(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    agent = started(tmp)
    state = agent.config.state_dir
    bundle = make_bundle(sample_parts, tmp / "v2.edgebundle", demo_key, version="1.1.0")
    crashed_in(state, Phase.COMMITTED, bundle, "1.1.0")
    again = make_agent(tmp)
    again.recover_and_serve()
    assert again.recovered.action == "none" and served(again) == "1.0.0"
    (state / "update.json").write_bytes(b'{"schema": 1, "job": {"phase": "trial"')  # torn
    third = make_agent(tmp)
    third.recover_and_serve()
    assert third.recovered.action == "none" and served(third) == "1.0.0"
    assert (state / "update.json.unreadable").exists()
