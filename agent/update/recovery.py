"""Where the last job died -> what to do, applied at start before `current` is served.

Mender's state machine is the model. The store's links only ever name verified
bundles and move atomically, and the candidate becomes `current` at the swap (its
old model `previous`), so the table only has to say which link to serve and how the
job ends:

| phase in STATE/update.json     | at start                                                   |
|--------------------------------|------------------------------------------------------------|
| none, or a final phase         | nothing                                                    |
| accepted, downloading          | resume: the job restarts from downloading, the partial     |
|                                | file in STATE/incoming/ stays and the fetch resumes        |
| verifying, validating, shadow  | discard the candidate (its unpack and download); the job   |
|                                | ends failed (update.interrupted); `current` is unchanged   |
| swapping, trial (deploy)       | if `current` is the candidate: count a crash for it, swap  |
|                                | the links back (`previous` is served) and end rolled_back; |
|                                | crashes >= trial.max_crashes also mark it bad              |
|                                | (update.crash_loop). Else the swap never happened: failed  |
| swapping (rollback)            | `current` is the target: the rollback is done; else failed |

Always afterwards: `Admission.serve_current` serves `current`, falling back to
`previous`; the store's start-up gc removes a bundle neither link names.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.config.model import AgentConfig
from agent.events import Emit
from agent.protocol.update import DeployRequest, Phase, TrialSpec
from agent.store import Store
from agent.update.errors import UpdateCode, UpdateError
from agent.update.jobs import INCOMING, trial_defaults
from agent.update.journal import JobRecord, Journal

log = logging.getLogger(__name__)

RESUME = frozenset({Phase.ACCEPTED, Phase.DOWNLOADING})
DISCARD = frozenset({Phase.VERIFYING, Phase.VALIDATING, Phase.SHADOW})
ROLL_BACK = frozenset({Phase.SWAPPING, Phase.TRIAL})


@dataclass(frozen=True)
class Recovered:
    action: str  # "none", "resume", "discarded", "rolled_back", "done", "failed"
    job: JobRecord | None = None

    @property
    def resume(self) -> JobRecord | None:
        return self.job if self.action == "resume" else None


def recover(config: AgentConfig, journal: Journal, store: Store, emit: Emit) -> Recovered:
    job = journal.job
    incoming = Path(config.state_dir) / INCOMING
    if job is None or job.phase.final:
        _clean_incoming(incoming, keep=None)
        return Recovered("none", job)
    if job.phase in RESUME:
        keep = _sha_of(job)
        _clean_incoming(incoming, keep=keep)
        log.info("job %s died while downloading %s: resuming", job.id, job.version)
        return Recovered("resume", job)
    if job.phase in DISCARD:
        _clean_incoming(incoming, keep=None)
        if job.candidate_dir is not None:
            store.discard(Path(job.candidate_dir))
        return _end(
            journal, emit, job, Phase.FAILED, UpdateCode.INTERRUPTED,
            f"the agent stopped during {job.phase.value}; candidate {job.version} discarded, "
            "the served model is unchanged", "discarded",
        )  # fmt: skip
    assert job.phase in ROLL_BACK
    _clean_incoming(incoming, keep=None)
    current = store.current()
    is_current = current is not None and current.name == job.candidate_sha
    if job.kind == "rollback":
        if is_current:
            return _end(journal, emit, job, Phase.ROLLED_BACK, None,
                        f"rolled back to {job.version} (finished at start)", "done")  # fmt: skip
        return _end(journal, emit, job, Phase.FAILED, UpdateCode.INTERRUPTED,
                    f"the agent stopped before the rollback to {job.version} swapped", "failed")  # fmt: skip
    if not is_current:
        if job.phase is Phase.SWAPPING and job.candidate_dir is not None:
            store.discard(Path(job.candidate_dir))
        return _end(
            journal, emit, job, Phase.FAILED, UpdateCode.INTERRUPTED,
            f"the agent stopped during {job.phase.value} before {job.version} was made current; "
            "the served model is unchanged", "failed",
        )  # fmt: skip
    assert job.candidate_sha is not None
    crashes = journal.count_crash(job.candidate_sha)
    spec = _trial_spec(config, job)
    previous = store.previous()
    if previous is None:
        # Nothing to go back to (the first model ever deployed): it keeps serving.
        log.error("job %s died in %s with no previous model; serving %s", job.id,
                  job.phase.value, job.version)  # fmt: skip
        return _end(journal, emit, job, Phase.FAILED, UpdateCode.INTERRUPTED,
                    f"the agent stopped during {job.phase.value}; no previous model to go back "
                    f"to, {job.version} serves on", "failed")  # fmt: skip
    store.rollback()
    marked = crashes >= spec.max_crashes
    reason = (
        f"the agent stopped during {job.phase.value} of {job.version} "
        f"(crash {crashes} of this version); rolled back to {job.previous_version}"
    )
    if marked:
        journal.mark_bad(job.version, job.candidate_sha, f"{crashes} crash(es) in trial")
        reason += f"; marked bad after {crashes} crash(es) (trial.max_crashes {spec.max_crashes})"
    code = UpdateCode.CRASH_LOOP if marked else UpdateCode.INTERRUPTED
    recovered = _end(journal, emit, job, Phase.ROLLED_BACK, code, reason, "rolled_back")
    return recovered


def _trial_spec(config: AgentConfig, job: JobRecord) -> TrialSpec:
    with contextlib.suppress(UpdateError, ValueError):
        request = DeployRequest.from_args(job.request)
        if request.trial is not None:
            return request.trial
    return trial_defaults(config)


def _end(
    journal: Journal,
    emit: Emit,
    job: JobRecord,
    phase: Phase,
    code: str | None,
    reason: str,
    action: str,
) -> Recovered:
    final = job.at(phase, code=code, reason=reason)
    journal.record(final)
    emit(phase.event, reason, job=job.id, version=job.version, code=code, recovered=True)
    return Recovered(action, final)


def _sha_of(job: JobRecord) -> str | None:
    sha = job.request.get("sha256")
    return sha if isinstance(sha, str) else None


def _clean_incoming(incoming: Path, keep: str | None) -> None:
    """Partial downloads nobody resumes would only eat the disk."""
    if not incoming.is_dir():
        return
    for entry in incoming.iterdir():
        if keep is not None and entry.name.startswith(keep):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
                log.info("removed stale download %s", entry.name)


__all__ = ["Recovered", "recover"]
