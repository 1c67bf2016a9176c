"""Typed replies of the update commands: what the device builds, what a console reads."""

from __future__ import annotations

from typing import Any

import pytest

from agent.protocol.messages import ProtocolError
from agent.protocol.update import (
    BadVersion,
    CancelAccepted,
    JobAccepted,
    ModelRef,
    Phase,
    RollbackRequest,
    UpdateStatus,
)
from agent.update.journal import JobRecord

# The journal's own record, as the device sends it in `update.status`.
JOURNAL_JOB = JobRecord(
    id="j1", kind="deploy", phase=Phase.TRIAL, request={"url": "http://x/b"}, version="1.1.0",
    started=1767225600.0, phase_started=1767225610.5, candidate_sha="b" * 64,
    candidate_dir="/s/bundles/b", previous_version="1.0.0", previous_sha="a" * 64, mode="hot",
    figures={"swap_s": 0.01},
).to_json()  # fmt: skip


def test_job_accepted_round_trips() -> None:
    for reply in (JobAccepted("j1"), JobAccepted("j2", "1.0.0")):
        assert JobAccepted.from_json(reply.to_json()) == reply
    assert JobAccepted("j1").to_json() == {"job": "j1", "accepted": True}


def test_update_status_reads_the_journal_form() -> None:
    status = UpdateStatus(
        job=None, running=True, served=ModelRef("1.1.0", "b" * 64),
        previous=ModelRef("1.0.0", "a" * 64),
        bad_versions=(BadVersion("0.9.0", "c" * 64, "trial", 1.0),), job_json=JOURNAL_JOB,
    )  # fmt: skip
    read = UpdateStatus.from_json(status.to_json())
    assert read.job is not None and read.job.known_phase is Phase.TRIAL
    assert read.job.previous_version == "1.0.0" and read.job.figures == {"swap_s": 0.01}
    assert read.job.extra["mode"] == "hot"
    assert read.served == status.served and read.previous == status.previous
    assert read.bad_versions == status.bad_versions and read.running
    assert read.to_json() == status.to_json()


def test_rollback_arguments_round_trip() -> None:
    for request in (RollbackRequest(), RollbackRequest(version="1.0.0")):
        assert RollbackRequest.from_args(request.to_args()) == request
    assert RollbackRequest().to_args() == {}  # the device's own previous slot


def test_cancel_round_trips() -> None:
    reply = CancelAccepted("j1", "downloading")
    assert CancelAccepted.from_json(reply.to_json()) == reply


@pytest.mark.parametrize(
    ("reader", "body", "field"),
    [
        (JobAccepted.from_json, {"job": "j1"}, "accepted"),
        (JobAccepted.from_json, {"job": 3, "accepted": True}, "job"),
        (JobAccepted.from_json, [], "object"),
        (UpdateStatus.from_json, {"running": "no"}, "running"),
        (UpdateStatus.from_json, {"job": {"id": "j", "phase": 1}}, "job.phase"),
        (UpdateStatus.from_json, {"bad_versions": [{"version": 2}]}, "bad_versions[0].version"),
        (UpdateStatus.from_json, {"served": {"version": "1", "sha256": 5}}, "served.sha256"),
        (CancelAccepted.from_json, {"job": "j", "cancelling": True}, "phase"),
    ],
)
def test_bad_replies_are_protocol_errors_naming_the_field(
    reader: Any, body: Any, field: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        reader(body)
    assert info.value.code == "reply.malformed"
    assert field in info.value.message, info.value.message
