"""The retained `edgerun/v1/{device}/state` body as typed values.

The device builds its state only through `ReportedState` (agent/link/link.py) and the
console reads it only through `ReportedState.from_json`, which checks every field's
type and raises ProtocolError(state.malformed) naming the field. It is tolerant in
the two ways a fleet of mixed agent versions needs: a missing optional field has its
default (an older agent), an unknown extra field is left out (a newer agent), and
neither is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.protocol.messages import Code
from agent.protocol.reader import Reader, Subject
from agent.protocol.update import Phase

STATE = Subject("state", Code.STATE_MALFORMED)


@dataclass(frozen=True)
class ModelInfo:
    """The model a slot holds: what `model`, `update.model` and `last_known_good` show."""

    name: str
    version: str
    sha256: str
    runtime: str = ""  # only for the served model
    # Only for the served model: the bundle variant it runs and why the device chose
    # it (agent/variants/); empty from agents before variants.
    variant: str = ""
    variant_reason: str = ""
    # Only for the served model: the execution providers/delegates that really
    # compute, best first (onnxruntime's session.get_providers()); empty from older agents.
    providers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "sha256": self.sha256}
        if self.runtime:
            out["runtime"] = self.runtime
        if self.variant:
            out["variant"] = self.variant
            out["variant_reason"] = self.variant_reason
        if self.providers:
            out["providers"] = list(self.providers)
        return out

    @classmethod
    def read(cls, r: Reader | None) -> ModelInfo | None:
        if r is None:
            return None
        return cls(
            name=r.text("name", "") or "",
            version=r.need_text("version"),
            sha256=r.text("sha256", "") or "",
            runtime=r.text("runtime", "") or "",
            variant=r.text("variant", "") or "",
            variant_reason=r.text("variant_reason", "") or "",
            providers=r.names("providers"),
        )


@dataclass(frozen=True)
class Slots:
    """The bundle directories (sha256) `current` and `previous` point at."""

    current: str | None = None
    previous: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current, "previous": self.previous}


@dataclass(frozen=True)
class Health:
    ready: bool = False
    overloaded: bool = False

    @property
    def word(self) -> str:
        """One word for a table: overloaded beats not ready beats ready."""
        if self.overloaded:
            return "overloaded"
        return "ready" if self.ready else "not_ready"

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "overloaded": self.overloaded}


@dataclass(frozen=True)
class UpdateSnapshot:
    """The running or last update job, short form (`UpdateService.snapshot()`)."""

    job: str
    kind: str  # "deploy" or "rollback"
    phase: str  # a Phase value; kept as text, so a phase a newer agent adds still reads
    version: str
    code: str | None = None  # the error code of a failed or rolled back job
    model: ModelInfo | None = None  # the model served once the job ended

    @property
    def known_phase(self) -> Phase | None:
        try:
            return Phase(self.phase)
        except ValueError:
            return None

    @property
    def final(self) -> bool:
        phase = self.known_phase
        return phase is not None and phase.final

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job": self.job,
            "kind": self.kind,
            "phase": self.phase,
            "version": self.version,
        }
        if self.code is not None:
            out["code"] = self.code
        if self.final:
            out["model"] = None if self.model is None else self.model.to_json()
        return out

    @classmethod
    def read(cls, r: Reader | None) -> UpdateSnapshot | None:
        if r is None:
            return None
        return cls(
            job=r.need_text("job"),
            kind=r.text("kind", "deploy") or "deploy",
            phase=r.need_text("phase"),
            version=r.text("version", "") or "",
            code=r.text("code"),
            model=ModelInfo.read(r.child("model")),
        )


@dataclass(frozen=True)
class ReportedState:
    """What a device reports of itself, retained, re-sent on change and on connect."""

    device_id: str
    agent_version: str = ""
    model: ModelInfo | None = None  # the served model; None while none is
    slots: Slots = field(default_factory=Slots)
    # The model in the `previous` slot: where a rollback goes (each device its own).
    last_known_good: ModelInfo | None = None
    groups: tuple[str, ...] = ()
    config_digest: str = ""
    tunable: dict[str, Any] = field(default_factory=dict)
    health: Health = field(default_factory=Health)
    desired: dict[str, Any] = field(default_factory=dict)  # KubeEdge twin desires
    update: UpdateSnapshot | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "agent_version": self.agent_version,
            "model": None if self.model is None else self.model.to_json(),
            "slots": self.slots.to_json(),
            "last_known_good": None
            if self.last_known_good is None
            else self.last_known_good.to_json(),
            "groups": list(self.groups),
            "config_digest": self.config_digest,
            "tunable": dict(self.tunable),
            "health": self.health.to_json(),
            "desired": dict(self.desired),
            "update": None if self.update is None else self.update.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> ReportedState:
        r = Reader.of(obj, "", STATE)
        slots = r.child("slots")
        health = r.child("health")
        return cls(
            device_id=r.need_text("device_id"),
            agent_version=r.text("agent_version", "") or "",
            model=ModelInfo.read(r.child("model")),
            slots=Slots()
            if slots is None
            else Slots(slots.text("current"), slots.text("previous")),
            last_known_good=ModelInfo.read(r.child("last_known_good")),
            groups=r.names("groups"),
            config_digest=r.text("config_digest", "") or "",
            tunable=r.mapping("tunable"),
            health=Health()
            if health is None
            else Health(health.flag("ready"), health.flag("overloaded")),
            desired=r.mapping("desired"),
            update=UpdateSnapshot.read(r.child("update")),
        )


__all__ = ["Health", "ModelInfo", "ReportedState", "Slots", "UpdateSnapshot"]
