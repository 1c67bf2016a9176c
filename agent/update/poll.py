"""Pull updates: poll the signed release index and deploy through the UpdateService port.

Two ways in, one thread (so a slow repository never blocks the MQTT link):

* every `update.poll_s` seconds (0: off) the newest release of the served model's name
  that is newer than what is served, runnable by this agent and not refused before as
  marked bad, is deployed (`origin="poll"`);
* a desired version (the KubeEdge twin's `model_version`, `want()`) is looked up in the
  index and deployed (`origin="twin"`). While a desired version is set it wins: the poll
  does not move the device past what the twin pins.

Every refusal (index invalid/expired/rolled back, unknown version, the service's own
refusals) is an event and `problem`, which the twin reports as `model_status`; the model
served keeps serving.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from functools import cmp_to_key
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import __version__
from agent.config.loader import read_public_keys
from agent.config.model import AgentConfig
from agent.events import Emit
from agent.names import shown
from agent.protocol.events import EventKind
from agent.update.errors import UpdateCode, UpdateError
from agent.update.fetch.http import tls_context
from agent.update.index import IndexGuard, Release, runs_on
from agent.update.ports import UpdateService
from agent.update.repository import Repository, http_getter
from agent.version import VersionFormatError, compare_versions, parse_version

log = logging.getLogger(__name__)

# (name, version) of the model served now, or None.
Served = Callable[[], tuple[str, str] | None]
RETRY_S = 3600.0  # the same release is not deployed again sooner (a failed job, say)
# Phases a job is in while it runs; `model_status` shows them (UpdateService.status()).
_FINAL = {"committed", "failed", "rolled_back", "cancelled"}


class PullUpdates:
    def __init__(
        self,
        repository: Repository,
        service: UpdateService,
        served: Served,
        emit: Emit,
        poll_s: float,
        agent_version: str = __version__,
        clock: Callable[[], float] = time.monotonic,
        retry_s: float = RETRY_S,
    ) -> None:
        self.repository = repository
        self.service = service
        self.served = served
        self.emit = emit
        self.poll_s = poll_s
        self.agent_version = agent_version
        self.clock = clock
        self.retry_s = retry_s
        self.problem: str | None = None  # why the wanted (or newest) release is not served
        self._lock = threading.Lock()
        self._wanted: str | None = None
        self._attempts: dict[tuple[str, str], float] = {}  # (version, sha256) -> when
        self._bad: set[str] = set()
        self._last_event: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    def want(self, version: str | None) -> None:
        """A desired version (from the twin); None or "" clears it. Checked on the thread."""
        with self._lock:
            self._wanted = version or None
        self._wake.set()

    @property
    def wanted(self) -> str | None:
        with self._lock:
            return self._wanted

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="update-pull", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        if self.poll_s > 0 or self.wanted is not None:
            self.check_once()
        while not self._stop.is_set():
            # Woken by want() or stop(), or the poll period passed: either way, look again.
            self._wake.wait(self.poll_s if self.poll_s > 0 else None)
            if self._stop.is_set():
                break
            self._wake.clear()
            self.check_once()

    # ------------------------------------------------------------------ one pass

    def check_once(self) -> dict[str, Any] | None:
        """One look at the index; returns the service's answer when a deploy was started."""
        try:
            return self._check()
        except UpdateError as exc:
            self._refused(exc)
            return None
        except Exception:  # a bug here must not kill the thread nor the served model
            log.exception("pull update check failed")
            self._refused(UpdateError(UpdateCode.INTERNAL, "pull update check failed (a bug)"))
            return None

    def _check(self) -> dict[str, Any] | None:
        wanted = self.wanted
        served = self.served()
        if wanted is not None:
            try:
                parse_version(wanted)
            except VersionFormatError as exc:
                raise UpdateError(
                    UpdateCode.BAD_ARGS,
                    f"desired model_version {shown(wanted)} is not a version: {exc}",
                ) from None
            if served is not None and served[1] == wanted:
                self._settled()
                return None
        elif self.poll_s <= 0:
            return None
        elif served is None:
            # The first model comes from model.bundle (installing at start, maybe right
            # now) or a desired version; the poll only moves a served model forward.
            log.debug("pull updates: no model served yet; nothing to poll for")
            return None
        version: str | None
        index = self.repository.latest()
        if served is None:
            # A fresh device given a desired version: the index names the model when it
            # lists only one.
            names = sorted({r.name for r in index.releases})
            if len(names) != 1:
                raise UpdateError(
                    UpdateCode.NO_SUCH_VERSION,
                    "no model is served and the release index lists "
                    f"{len(names)} model names ({', '.join(names[:8]) or 'none'}): "
                    "install a first bundle (model.bundle) so the device knows which to pull",
                )
            name, version = names[0], None
        else:
            name, version = served
        release: Release | None
        origin: Literal["twin", "poll"]
        if wanted is not None:
            origin = "twin"
            release = index.find(name, wanted)
            if release is None:
                listed = ", ".join(sorted(index.versions(name), key=_key)[-8:]) or "none"
                raise UpdateError(
                    UpdateCode.NO_SUCH_VERSION,
                    f"desired model_version {wanted} of {name} is not in the release index "
                    f"(counter {index.counter}; it lists {listed})",
                    version=wanted,
                )
            if not runs_on(release, self.agent_version):
                raise UpdateError(
                    UpdateCode.BAD_ARGS,
                    f"release {name} {wanted} needs agent {release.min_agent_version}; "
                    f"this agent is {self.agent_version}",
                )
        else:
            origin = "poll"
            skip = self._bad | _bad_versions(self.service.status())
            release = index.newest(name, version, self.agent_version, skip=skip)
            if release is None:
                self._settled()
                return None
        return self._deploy(release, origin)

    def _deploy(self, release: Release, origin: Literal["twin", "poll"]) -> dict[str, Any] | None:
        key = (release.version, release.sha256)
        now = self.clock()
        last = self._attempts.get(key)
        if last is not None and now - last < self.retry_s:
            return None
        try:
            answer = self.service.deploy(release.deploy_request(origin))
        except UpdateError as exc:
            if exc.code == UpdateCode.BUSY:
                return None  # a job runs; the next pass looks again
            if exc.code == UpdateCode.MARKED_BAD:
                self._bad.add(release.version)
            self._attempts[key] = now
            raise
        self._attempts[key] = now
        self._settled()
        self.emit(
            EventKind.UPDATE_PULL,
            f"release {release.name} {release.version} from the release index: deploy "
            f"started ({origin})",
            version=release.version,
            origin=origin,
            job=answer.get("job"),
        )
        return answer

    def _settled(self) -> None:
        self.problem = None
        self._last_event = None

    def _refused(self, exc: UpdateError) -> None:
        text = f"{exc.code}: {exc.message}"
        self.problem = text
        if text != self._last_event:  # the same refusal every poll is said once
            self._last_event = text
            self.emit(EventKind.UPDATE_PULL_REFUSED, exc.message, code=exc.code, **exc.data)
        log.warning("pull update refused: %s", text)

    # ------------------------------------------------------------------ reporting

    def model_status(self) -> str:
        """For the twin: the running job's phase, else why the wanted release is not
        served, else "serving" (or "no_model")."""
        try:
            status = self.service.status()
        except Exception:  # status must never break the twin report
            log.exception("update status failed")
            status = {}
        job = status.get("job")
        phase = _phase(status)
        if phase is not None and phase not in _FINAL:
            return phase
        if self.problem is not None:
            return f"failed: {self.problem}"
        served = self.served()
        wanted = self.wanted
        # The job for the wanted version ended without it serving: say how it ended.
        if (
            isinstance(job, Mapping)
            and phase in ("failed", "rolled_back", "cancelled")
            and wanted is not None
            and job.get("version") == wanted
            and (served is None or served[1] != wanted)
        ):
            return f"{phase}: {job.get('code')}: {job.get('reason')}"
        return "serving" if served is not None else "no_model"


def _bad_versions(status: Mapping[str, Any]) -> set[str]:
    """Versions the service marked bad (rolled back): the poll does not offer them again."""
    bad = status.get("bad_versions")
    if not isinstance(bad, list):
        return set()
    return {
        b["version"] for b in bad if isinstance(b, Mapping) and isinstance(b.get("version"), str)
    }


def _phase(status: Mapping[str, Any]) -> str | None:
    job = status.get("job")
    phase = job.get("phase") if isinstance(job, Mapping) else status.get("phase")
    return phase if isinstance(phase, str) else None


_key = cmp_to_key(compare_versions)


def build_pull_updates(
    repository_url: str,
    state_dir: Path,
    keys: list[Ed25519PublicKey],
    service: UpdateService,
    served: Served,
    emit: Emit,
    *,
    poll_s: float,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_redirects: int,
    tls: ssl.SSLContext | None = None,
) -> PullUpdates | None:
    """Pull updates from explicit parts; None when no repository is set."""
    if not repository_url:
        return None
    getter = http_getter(connect_timeout_s, read_timeout_s, max_redirects, tls)
    repository = Repository(repository_url, IndexGuard(state_dir, keys), getter)
    return PullUpdates(repository, service, served, emit, poll_s)


class PullComponent:
    """PullUpdates as an agent component (started after the link, stopped before)."""

    def __init__(self, pull: PullUpdates) -> None:
        self.pull = pull

    async def start(self) -> None:
        self.pull.start()

    async def stop(self) -> None:
        self.pull.stop()


def pull_for(
    config: AgentConfig,
    service: UpdateService,
    served: Served,
    emit: Emit,
    environ: Mapping[str, str] | None = None,
) -> PullUpdates | None:
    """What `edge-agent run` attaches when `update.repository` is set. Raises ConfigError
    (naming update.index_keys / update.ca_file) when a key or the CA file cannot be read."""
    up = config.update
    if not up.repository or not up.enabled:
        return None
    if up.index_keys:
        keys = read_public_keys(list(up.index_keys), "update.index_keys", environ)
    else:
        keys = read_public_keys(list(config.trust.public_keys), "trust.public_keys", environ)
    tls = tls_context(up.ca_file, environ)
    return build_pull_updates(
        up.repository,
        config.state_dir,
        keys,
        service,
        served,
        emit,
        poll_s=up.poll_s,
        connect_timeout_s=up.connect_timeout_s,
        read_timeout_s=up.read_timeout_s,
        max_redirects=up.max_redirects,
        tls=tls,
    )


__all__ = ["PullComponent", "PullUpdates", "Served", "build_pull_updates", "pull_for"]
