"""The narrow seams of the update package. Each side depends on these, not on each other.

link commands / twin / poll --UpdateService--> jobs.py --Fetcher--> fetch/http.py, fetch/mqtt.py
                                                |   \\--ShadowRunner--> shadow.py
                                                |    \\-TrialMonitor--> trial.py
                                                \\-- Admission (verify, validate) + ModelHost (swap)
fetch/mqtt.py --ChunkTransport--> the MQTT link
ModelHost --RequestObserver--> trial.py, shadow.py   (agent/serving.py)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.protocol.state import UpdateSnapshot
from agent.protocol.update import DeployRequest, RollbackRequest, ShadowSpec, TrialSpec

if TYPE_CHECKING:
    from agent.serving import LoadedModel

# (bytes so far, total bytes); called at most a few times a second.
Progress = Callable[[int, int], None]


class Fetcher(Protocol):
    """Gets the bundle a deploy names into `partial`, resuming what is already there.

    Never writes more than `request.size` bytes (an endless stream is cut and refused:
    update.oversize); returns the path of the complete file once its sha256 equals
    `request.sha256` (else update.hash_mismatch, and the partial file is removed).
    Raises only UpdateError. Returns early with update.cancelled when `cancel` is set.
    """

    def fetch(
        self, request: DeployRequest, partial: Path, progress: Progress, cancel: threading.Event
    ) -> Path: ...


class ChunkTransport(Protocol):
    """What an MQTT chunk transfer needs from the link (implemented by agent/link)."""

    def subscribe_chunks(
        self,
        transfer_id: str,
        on_chunk: Callable[[bytes], None],
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        """Route chunk payloads of `transfer_id` to `on_chunk` (on the network thread:
        it must only queue), across reconnects; `on_reconnect` runs after each new
        connection's subscription, so the fetcher can say again what it lacks."""
        ...

    def unsubscribe_chunks(self, transfer_id: str) -> None: ...

    def request_chunks(self, transfer_id: str, body: bytes) -> None:
        """Publish which chunks are still missing (the body's format: agent/protocol/transfer.py)."""
        ...


@dataclass(frozen=True)
class Verdict:
    """Outcome of a shadow evaluation or a trial: ok, or the bound crossed and the figures."""

    ok: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    # The bound crossed (a TrialSpec/ShadowSpec field name, or "cancelled"); None when ok.
    bound: str | None = None


class TrialMonitor(Protocol):
    def baseline(self) -> dict[str, float]:
        """Figures of the model served now on this device (p95_ms, error_rate, top-1 mix...),
        taken just before a swap; the trial compares the candidate against them."""
        ...

    def watch(
        self,
        generation: int,
        spec: TrialSpec,
        baseline: dict[str, float],
        cancel: threading.Event,
        progress: Callable[[dict[str, float]], None],
    ) -> Verdict:
        """Block while `generation` serves live traffic for the trial window; return at
        once when a bound is crossed (ok False, reason naming the bound and figures)."""
        ...


class ShadowRunner(Protocol):
    def evaluate(
        self,
        candidate: LoadedModel,
        spec: ShadowSpec,
        cancel: threading.Event,
        progress: Callable[[dict[str, float]], None],
    ) -> Verdict:
        """Run `candidate` on a sample of live requests beside the served model (answers
        still come from the served one) until a verdict; figures: agreement, both p50/p95."""
        ...


class UpdateService(Protocol):
    """What the command table, the KubeEdge twin and the release-index poll call."""

    def deploy(self, request: DeployRequest) -> dict[str, Any]:
        """Accept a job at once ({"job": id, "accepted": True}) or raise UpdateError."""
        ...

    def rollback(self, request: RollbackRequest) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]:
        """The running or last job: id, phase, figures; the served and previous versions."""
        ...

    def cancel(self) -> dict[str, Any]: ...

    def snapshot(self) -> UpdateSnapshot | None:
        """Short form for the retained `state`: job, kind, phase, version, code; at the
        end also the model served. None before the first job."""
        ...


__all__ = [
    "ChunkTransport",
    "Fetcher",
    "Progress",
    "ShadowRunner",
    "TrialMonitor",
    "UpdateService",
    "Verdict",
]
