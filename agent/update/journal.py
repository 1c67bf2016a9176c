"""`STATE/update.json`: the one record of the update job, the bad versions, the crash counts.

Written whole, atomically (tmp file + fsync + rename + fsync of the directory, like the
store's links), before each phase starts, so at any instant the file on disk names the
phase the job was in and everything recovery needs (the request, the candidate, what
served before). A file that cannot be read (torn by a disk fault, edited by hand) is
moved aside and treated as "no job": recovery then has nothing to do and `current` is
served, which is always safe because the store's links only ever name verified bundles.

The one owner is `Journal`; it serialises writers with a lock (the job thread, the
command thread for refusals, recovery at start).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.atomicfile import remove_stale_temps, write_atomic

# The wire type is the journal's record too: one definition for both.
from agent.protocol.update import BadVersion, Phase

log = logging.getLogger(__name__)

JOURNAL_FILE = "update.json"
SCHEMA = 1
MAX_JOURNAL_BYTES = 1 << 20  # a record is a few KB; anything bigger is not ours
MAX_BAD = 64  # bad versions remembered (oldest forgotten first)


@dataclass(frozen=True)
class JobRecord:
    """One job as persisted. `request` is the deploy's args (`DeployRequest.to_args`) or
    the rollback's target; the candidate is named by sha256 and bundle directory."""

    id: str
    kind: str  # "deploy" or "rollback"
    phase: Phase
    request: dict[str, Any]
    version: str  # the version being installed
    started: float
    phase_started: float
    candidate_sha: str | None = None
    candidate_dir: str | None = None
    previous_version: str | None = None
    previous_sha: str | None = None
    mode: str | None = None  # "hot" or "cold", once decided
    figures: dict[str, Any] = field(default_factory=dict)
    code: str | None = None
    reason: str | None = None
    finished: float | None = None

    def at(self, phase: Phase, **changes: Any) -> JobRecord:
        now = time.time()
        final: dict[str, Any] = {"finished": now} if phase.final else {}
        return replace(self, phase=phase, phase_started=now, **final, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "phase": self.phase.value,
            "request": self.request,
            "version": self.version,
            "started": self.started,
            "phase_started": self.phase_started,
            "candidate_sha": self.candidate_sha,
            "candidate_dir": self.candidate_dir,
            "previous_version": self.previous_version,
            "previous_sha": self.previous_sha,
            "mode": self.mode,
            "figures": self.figures,
            "code": self.code,
            "reason": self.reason,
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, raw: Any) -> JobRecord:
        """Raises ValueError on anything that is not a record this agent wrote."""
        if not isinstance(raw, dict):
            raise ValueError("job is not an object")
        try:
            phase = Phase(_typed(raw, "phase", str))
        except ValueError:
            raise ValueError(f"unknown phase {str(raw.get('phase'))[:40]!r}") from None
        request = _typed(raw, "request", dict)
        figures = raw.get("figures", {})
        if not isinstance(figures, dict):
            raise ValueError("figures is not an object")
        return cls(
            id=_typed(raw, "id", str),
            kind=_typed(raw, "kind", str),
            phase=phase,
            request=request,
            version=_typed(raw, "version", str),
            started=_number(raw, "started"),
            phase_started=_number(raw, "phase_started"),
            candidate_sha=_opt(raw, "candidate_sha"),
            candidate_dir=_opt(raw, "candidate_dir"),
            previous_version=_opt(raw, "previous_version"),
            previous_sha=_opt(raw, "previous_sha"),
            mode=_opt(raw, "mode"),
            figures=figures,
            code=_opt(raw, "code"),
            reason=_opt(raw, "reason"),
            finished=None if raw.get("finished") is None else _number(raw, "finished"),
        )


def _typed(raw: dict[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} is not a {kind.__name__}")
    return value


def _number(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} is not a number")
    return float(value)


def _opt(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


@dataclass(frozen=True)
class JournalState:
    job: JobRecord | None = None
    bad: tuple[BadVersion, ...] = ()
    crashes: dict[str, int] = field(default_factory=dict)  # candidate sha256 -> deaths in trial

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "job": None if self.job is None else self.job.to_json(),
            "bad_versions": [b.to_json() for b in self.bad],
            "crashes": dict(self.crashes),
        }


def parse_journal(data: bytes) -> JournalState:
    """The journal's bytes as state; raises ValueError for anything else."""
    if len(data) > MAX_JOURNAL_BYTES:
        raise ValueError(f"{len(data)} bytes, more than {MAX_JOURNAL_BYTES}")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise ValueError(f"not an update journal of schema {SCHEMA}")
    job = None if raw.get("job") is None else JobRecord.from_json(raw["job"])
    bad_raw = raw.get("bad_versions", [])
    if not isinstance(bad_raw, list):
        raise ValueError("bad_versions is not a list")
    bad = []
    for entry in bad_raw[-MAX_BAD:]:
        if not isinstance(entry, dict):
            raise ValueError("a bad version is not an object")
        bad.append(
            BadVersion(
                _typed(entry, "version", str),
                _typed(entry, "sha256", str),
                str(entry.get("reason", ""))[:500],
                _number(entry, "ts"),
            )
        )
    crashes_raw = raw.get("crashes", {})
    if not isinstance(crashes_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in crashes_raw.items()
    ):
        raise ValueError("crashes is not an object of counts")
    return JournalState(job, tuple(bad), dict(list(crashes_raw.items())[-MAX_BAD:]))


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.path = self.root / JOURNAL_FILE
        self._lock = threading.Lock()
        # The one owner, at its start: no write is in flight, so any temporary file
        # beside the journal is a crash's leftover.
        remove_stale_temps(self.path)
        self._state = self._load()

    def _load(self) -> JournalState:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_JOURNAL_BYTES + 1)
        except FileNotFoundError:
            return JournalState()
        except OSError as exc:
            log.error("cannot read %s (%s); starting without an update record", self.path, exc)
            return JournalState()
        try:
            return parse_journal(data)
        except ValueError as exc:
            aside = self.path.with_name(f"{JOURNAL_FILE}.unreadable")
            log.error("%s is unreadable (%s); moved to %s", self.path, exc, aside.name)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return JournalState()

    @property
    def state(self) -> JournalState:
        return self._state

    @property
    def job(self) -> JobRecord | None:
        return self._state.job

    def record(self, job: JobRecord) -> None:
        """Persist `job` (its phase first of all) before the phase's work starts."""
        with self._lock:
            self._write(replace(self._state, job=job))

    def mark_bad(self, version: str, sha256: str, reason: str) -> None:
        with self._lock:
            kept = tuple(b for b in self._state.bad if b.sha256 != sha256)
            bad = (*kept, BadVersion(version, sha256, reason[:500], time.time()))[-MAX_BAD:]
            self._write(replace(self._state, bad=bad))

    def is_bad(self, version: str | None = None, sha256: str | None = None) -> BadVersion | None:
        for entry in self._state.bad:
            if entry.sha256 == sha256 or entry.version == version:
                return entry
        return None

    def count_crash(self, sha256: str) -> int:
        with self._lock:
            crashes = dict(self._state.crashes)
            crashes[sha256] = crashes.get(sha256, 0) + 1
            self._write(replace(self._state, crashes=crashes))
            return crashes[sha256]

    def _write(self, state: JournalState) -> None:
        data = (json.dumps(state.to_json(), sort_keys=True, indent=1) + "\n").encode()
        write_atomic(self.path, data, mode=0o600)
        self._state = state


__all__ = ["JOURNAL_FILE", "BadVersion", "JobRecord", "Journal", "JournalState", "parse_journal"]
