"""Wire types of over-the-air updates: the `deploy` and `rollback` arguments, job phases.

Schema-first: `DeployRequest.from_args` is the one parser of a deploy's arguments
(from an MQTT command, a twin's desired version resolved through the release index,
or a poll); it checks every field and raises UpdateError(update.bad_args) naming
the field, the bad value and what is allowed. `to_args` is its inverse (what a
console sends). Phases are also the event kinds: `update.<phase>`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from agent.names import is_name, shown
from agent.protocol.events import EventKind
from agent.protocol.messages import Code
from agent.protocol.reader import Reader, Subject
from agent.update.errors import UpdateCode, UpdateError
from agent.version import VersionFormatError, parse_version

SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_URL = 2048
MAX_BUNDLE_BYTES = 1 << 40  # the signed size is further capped by bundle_limits.max_bundle_mb


class Phase(StrEnum):
    """Where a job is. Persisted before each phase starts; also the event kind `update.<value>`."""

    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    SHADOW = "shadow"
    SWAPPING = "swapping"
    TRIAL = "trial"
    COMMITTED = "committed"  # final: the point of no return was passed
    FAILED = "failed"  # final: refused before the swap; the old model never stopped
    ROLLED_BACK = (
        "rolled_back"  # final: swapped, then went back (trial breach, crash loop, rollback)
    )
    CANCELLED = "cancelled"  # final

    @property
    def final(self) -> bool:
        return self in _FINAL

    @property
    def event(self) -> EventKind:
        return EventKind(f"update.{self.value}")


_FINAL = frozenset({Phase.COMMITTED, Phase.FAILED, Phase.ROLLED_BACK, Phase.CANCELLED})
Mode = Literal["auto", "hot", "cold"]
ShadowMetric = Literal["top1", "cosine"]


@dataclass(frozen=True)
class HttpSource:
    url: str  # http:// or https://; https is verified against the system CAs (or update.ca_file)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url}


@dataclass(frozen=True)
class MqttSource:
    transfer_id: str  # chunks arrive on edgerun/v1/{device}/bundle/{transfer_id}

    def to_json(self) -> dict[str, Any]:
        return {"transfer": self.transfer_id}


Source = HttpSource | MqttSource


@dataclass(frozen=True)
class TrialSpec:
    """Bounds watched on live traffic after a swap; crossing any one rolls back at once."""

    window_s: float = 60.0  # how long the trial lasts (0: commit at once, no trial)
    min_requests: int = (
        20  # fewer requests than this in the window: extend up to 3x, then commit on what was seen
    )
    max_error_rate: float = 0.02  # share of requests answered 5xx (runtime.failed, ...)
    max_p95_ratio: float = 2.0  # candidate p95 over the previous model's p95 on this device
    max_rss_growth_mb: float = 64.0  # RSS growth over the trial beyond the admitted figure
    max_nonfinite_rate: float = 0.0  # share of answers with NaN/inf or empty outputs
    max_drift: float = (
        0.25  # total variation distance of the top-1 class mix vs the previous model (classifiers)
    )
    max_crashes: int = 2  # agent deaths during the trial before the candidate is marked bad


@dataclass(frozen=True)
class ShadowSpec:
    """Run the candidate beside the served model on a sample of live requests first."""

    sample: float = 0.2  # share of live requests copied to the candidate
    duty_cycle: float = 0.25  # at most this share of one core spent on the candidate
    min_requests: int = 50  # compared requests needed for a verdict
    min_agreement: float = 0.95  # top-1 agreement (or mean cosine) needed to promote
    metric: ShadowMetric = "top1"
    timeout_s: float = 600.0  # not enough traffic by then: refused (update.shadow_disagreed)


@dataclass(frozen=True)
class DeployRequest:
    source: Source
    sha256: str
    size: int
    version: str
    name: str | None = None  # when given, the bundle's manifest name must match
    mode: Mode = "auto"
    shadow: ShadowSpec | None = None
    trial: TrialSpec | None = None  # None: the config's [update.trial] defaults
    allow_downgrade: bool = False
    force: bool = False  # deploy a version marked bad anyway
    origin: Literal["command", "twin", "poll"] = "command"

    @classmethod
    def from_args(cls, args: Mapping[str, Any], origin: str = "command") -> DeployRequest:
        p = _Args("deploy", args)
        url, transfer = p.get("url", str), p.get("transfer", str)
        if (url is None) == (transfer is None):
            raise p.bad(
                "url", 'exactly one of "url" (http/https) or "transfer" (an MQTT transfer id)'
            )
        source: Source
        if url is not None:
            source = HttpSource(_check_url(p, url))
        else:
            assert transfer is not None
            if not is_name(transfer):
                raise p.bad("transfer", "1-64 of A-Za-z0-9._-", transfer)
            source = MqttSource(transfer)
        sha = p.need("sha256", str)
        if not SHA256_RE.fullmatch(sha):
            raise p.bad("sha256", "64 lowercase hex digits", sha)
        size = p.need("size", int)
        if not 1 <= size <= MAX_BUNDLE_BYTES:
            raise p.bad("size", f"an integer from 1 to {MAX_BUNDLE_BYTES}", size)
        version = p.need("version", str)
        try:
            parse_version(version)
        except VersionFormatError as exc:
            raise p.bad("version", str(exc), version) from None
        name = p.get("name", str)
        if name is not None and not is_name(name):
            raise p.bad("name", "1-64 of A-Za-z0-9._-", name)
        mode = p.get("mode", str)
        if mode is None:  # absent; an empty string is a wrong value, not a default
            mode = "auto"
        if mode not in ("auto", "hot", "cold"):
            raise p.bad("mode", '"auto", "hot" or "cold"', mode)
        shadow_raw = p.get("shadow", (dict, bool))
        shadow = None
        if shadow_raw is True:
            shadow = ShadowSpec()
        elif isinstance(shadow_raw, dict):
            shadow = _shadow(_Args("deploy.shadow", shadow_raw))
        trial_raw = p.get("trial", dict)
        trial = _trial(_Args("deploy.trial", trial_raw)) if trial_raw is not None else None
        p.done()
        if origin not in ("command", "twin", "poll"):
            raise ValueError(origin)
        return cls(
            source=source,
            sha256=sha,
            size=size,
            version=version,
            name=name,
            mode=mode,
            shadow=shadow,
            trial=trial,
            allow_downgrade=bool(p.get_seen("allow_downgrade")),
            force=bool(p.get_seen("force")),
            origin=origin,  # type: ignore[arg-type]
        )

    def to_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.source.to_json(),
            "sha256": self.sha256,
            "size": self.size,
            "version": self.version,
            "mode": self.mode,
        }
        if self.name is not None:
            out["name"] = self.name
        if self.shadow is not None:
            out["shadow"] = _as_dict(self.shadow)
        if self.trial is not None:
            out["trial"] = _as_dict(self.trial)
        if self.allow_downgrade:
            out["allow_downgrade"] = True
        if self.force:
            out["force"] = True
        return out


def _as_dict(spec: TrialSpec | ShadowSpec) -> dict[str, Any]:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


# Each bound: (low, high); numbers must be finite and inside.
_TRIAL_BOUNDS: dict[str, tuple[float, float]] = {
    "window_s": (0, 86_400),
    "min_requests": (0, 1_000_000),
    "max_error_rate": (0, 1),
    "max_p95_ratio": (1, 1000),
    "max_rss_growth_mb": (0, 1 << 20),
    "max_nonfinite_rate": (0, 1),
    "max_drift": (0, 1),
    "max_crashes": (0, 100),
}
_SHADOW_BOUNDS: dict[str, tuple[float, float]] = {
    "sample": (0.001, 1),
    "duty_cycle": (0.01, 1),
    "min_requests": (1, 1_000_000),
    "min_agreement": (0, 1),
    "timeout_s": (1, 86_400),
}
_INT_FIELDS = {"min_requests", "max_crashes"}


def _numbers(p: _Args, bounds: dict[str, tuple[float, float]]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, (low, high) in bounds.items():
        kind: type | tuple[type, ...] = int if key in _INT_FIELDS else (int, float)
        value = p.get(key, kind)
        if value is None:
            continue
        if not (math.isfinite(value) and low <= value <= high):
            raise p.bad(key, f"a finite number from {low:g} to {high:g}", value)
        out[key] = value
    return out


def _trial(p: _Args) -> TrialSpec:
    values = _numbers(p, _TRIAL_BOUNDS)
    p.done()
    return TrialSpec(**values)  # type: ignore[arg-type]


def _shadow(p: _Args) -> ShadowSpec:
    values: dict[str, Any] = dict(_numbers(p, _SHADOW_BOUNDS))
    metric = p.get("metric", str)
    if metric is not None:
        if metric not in ("top1", "cosine"):
            raise p.bad("metric", '"top1" or "cosine"', metric)
        values["metric"] = metric
    p.done()
    return ShadowSpec(**values)


def _check_url(p: _Args, url: str) -> str:
    if len(url) > MAX_URL or not url.isascii() or any(c.isspace() or ord(c) < 0x21 for c in url):
        raise p.bad("url", f"an ASCII http(s) URL of at most {MAX_URL} characters", url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise p.bad("url", "an http:// or https:// URL with a host", url)
    if parts.username or parts.password:
        raise p.bad("url", "a URL without credentials (user:password@ would travel in logs)", url)
    return url


@dataclass
class _Args:
    """Typed access to one arguments object; remembers which keys were read."""

    where: str
    values: Mapping[str, Any]
    seen: set[str] = field(default_factory=set)

    def bad(self, key: str, allowed: str, value: object = None) -> UpdateError:
        got = "" if value is None else f", got {shown(value)}"
        return UpdateError(UpdateCode.BAD_ARGS, f"{self.where}: {key!r} must be {allowed}{got}")

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        self.seen.add(key)
        if key not in self.values or self.values[key] is None:
            return None
        value = self.values[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:  # True is an int in Python
            raise self.bad(key, " or ".join(k.__name__ for k in kinds), value)
        if not isinstance(value, kinds):
            raise self.bad(key, " or ".join(k.__name__ for k in kinds), value)
        return value

    def need(self, key: str, kind: type) -> Any:
        value = self.get(key, kind)
        if value is None:
            raise self.bad(key, f"given ({kind.__name__})")
        return value

    def get_seen(self, key: str) -> bool:
        value = self.get(key, bool)
        return bool(value)

    def done(self) -> None:
        if not isinstance(self.values, Mapping):
            raise UpdateError(UpdateCode.BAD_ARGS, f"{self.where}: arguments must be an object")
        unknown = sorted(set(self.values) - self.seen - {"allow_downgrade", "force"})
        if unknown:
            raise UpdateError(
                UpdateCode.BAD_ARGS,
                f"{self.where}: unknown argument(s) {', '.join(shown(k) for k in unknown[:8])}",
            )


@dataclass(frozen=True)
class RollbackRequest:
    version: str | None = None  # None: to `previous`
    allow_downgrade: bool = True  # a rollback is an explicit downgrade

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> RollbackRequest:
        p = _Args("rollback", args)
        version = p.get("version", str)
        if version is not None:
            try:
                parse_version(version)
            except VersionFormatError as exc:
                raise p.bad("version", str(exc), version) from None
        p.done()
        return cls(version=version)

    def to_args(self) -> dict[str, Any]:
        """What a console sends: no version means the device's own `previous` slot."""
        return {} if self.version is None else {"version": self.version}


# ----------------------------------------------------------------- job replies
# What the device answers to `deploy`, `rollback`, `update.status` and `update.cancel`
# (the `result` of an ok Reply). The update service builds them; a console reads
# them with `from_json`, which raises ProtocolError(reply.malformed) naming the field.


def _reader(value: object, what: str) -> Reader:
    return Reader.of(value, "", Subject(what, Code.REPLY_MALFORMED))


@dataclass(frozen=True)
class JobAccepted:
    """`deploy` and `rollback`: the job started (progress follows as events)."""

    job: str
    version: str | None = None  # rollback: the version it goes back to

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.job, "accepted": True}
        if self.version is not None:
            out["version"] = self.version
        return out

    @classmethod
    def from_json(cls, obj: Any) -> JobAccepted:
        r = _reader(obj, "job reply")
        if r.flag("accepted") is not True:
            raise r.bad("accepted", "true", obj.get("accepted"))
        return cls(job=r.need_text("job"), version=r.text("version"))


@dataclass(frozen=True)
class ModelRef:
    version: str | None  # None when the slot's manifest cannot be read
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256}

    @classmethod
    def read(cls, r: Reader | None) -> ModelRef | None:
        if r is None:
            return None
        return cls(version=r.text("version"), sha256=r.text("sha256", "") or "")


@dataclass(frozen=True)
class BadVersion:
    """A version rolled back once: refused again unless deployed with `force`."""

    version: str
    sha256: str
    reason: str
    ts: float

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "reason": self.reason,
                "ts": self.ts}  # fmt: skip


@dataclass(frozen=True)
class JobInfo:
    """One job as the journal keeps it (`update.status`'s `job`)."""

    id: str
    kind: str
    phase: str  # a Phase value, as text: a newer agent's phase still reads
    version: str
    started: float | None = None
    phase_started: float | None = None
    finished: float | None = None
    code: str | None = None
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    previous_version: str | None = None
    previous_sha: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # request, candidate, mode...

    @property
    def known_phase(self) -> Phase | None:
        try:
            return Phase(self.phase)
        except ValueError:
            return None

    @classmethod
    def read(cls, r: Reader | None) -> JobInfo | None:
        if r is None:
            return None
        known = {"id", "kind", "phase", "version", "started", "phase_started", "finished",
                 "code", "reason", "figures", "previous_version", "previous_sha"}  # fmt: skip
        return cls(
            id=r.need_text("id"),
            kind=r.text("kind", "deploy") or "deploy",
            phase=r.need_text("phase"),
            version=r.text("version", "") or "",
            started=r.number("started"),
            phase_started=r.number("phase_started"),
            finished=r.number("finished"),
            code=r.text("code"),
            reason=r.text("reason"),
            figures=r.mapping("figures"),
            previous_version=r.text("previous_version"),
            previous_sha=r.text("previous_sha"),
            extra={k: v for k, v in r.obj.items() if k not in known},
        )


@dataclass(frozen=True)
class UpdateStatus:
    """`update.status`: the running or last job, the served and the previous model."""

    job: JobInfo | None
    running: bool
    served: ModelRef | None
    previous: ModelRef | None
    bad_versions: tuple[BadVersion, ...] = ()
    job_json: dict[str, Any] | None = None  # the journal's own form, sent as is

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job_json,
            "running": self.running,
            "served": None if self.served is None else self.served.to_json(),
            "previous": None if self.previous is None else self.previous.to_json(),
            "bad_versions": [b.to_json() for b in self.bad_versions],
        }

    @classmethod
    def from_json(cls, obj: Any) -> UpdateStatus:
        r = _reader(obj, "update.status reply")
        bad = tuple(
            BadVersion(
                b.need_text("version"),
                b.text("sha256", "") or "",
                b.text("reason", "") or "",
                b.number("ts") or 0.0,
            )
            for b in r.children("bad_versions")
        )
        job = r.child("job")
        return cls(
            job=JobInfo.read(job),
            running=r.flag("running"),
            served=ModelRef.read(r.child("served")),
            previous=ModelRef.read(r.child("previous")),
            bad_versions=bad,
            job_json=None if job is None else dict(job.obj),
        )


@dataclass(frozen=True)
class CancelAccepted:
    """`update.cancel`: the job stops at its next step (never past the swap)."""

    job: str
    phase: str

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "cancelling": True, "phase": self.phase}

    @classmethod
    def from_json(cls, obj: Any) -> CancelAccepted:
        r = _reader(obj, "update.cancel reply")
        if r.flag("cancelling") is not True:
            raise r.bad("cancelling", "true", obj.get("cancelling"))
        return cls(job=r.need_text("job"), phase=r.need_text("phase"))


__all__ = [
    "BadVersion",
    "CancelAccepted",
    "DeployRequest",
    "HttpSource",
    "JobAccepted",
    "JobInfo",
    "Mode",
    "ModelRef",
    "MqttSource",
    "Phase",
    "RollbackRequest",
    "ShadowSpec",
    "Source",
    "TrialSpec",
    "UpdateStatus",
]
