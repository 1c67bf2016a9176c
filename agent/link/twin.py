"""The agent as a KubeEdge device: report `actual` twin values, take desired ones.

A desired `model_version` (KubeEdge's `expected`) is handed to the pull updates
(`DesiredVersions`, agent/update/poll.py), which resolve it through the signed release
index to a deploy; without a release index (`update.repository`) it is only recorded.
The desired values are kept in STATE/twin-desired.json, so after a restart the agent
re-applies the last desired version before the cloud says it again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.atomicfile import remove_stale_temps, write_atomic
from agent.events import Emit
from agent.link.client import MqttClient, MqttError
from agent.protocol import twin
from agent.protocol.events import EventKind
from agent.protocol.messages import ProtocolError
from agent.protocol.topics import TopicFilter, TwinTopics
from agent.strictjson import JsonRefusedError
from agent.strictjson import loads as strict_loads

log = logging.getLogger(__name__)

MAX_TWIN_BYTES = 64 * 1024  # a twin document of the properties below is far smaller
MAX_DESIRED = 32  # desired properties remembered (model_version is the one used)
DESIRED_FILE = "twin-desired.json"


class DesiredVersions(Protocol):
    """Who acts on a desired model_version (agent/update/poll.py PullUpdates)."""

    def want(self, version: str | None) -> None: ...

    def model_status(self) -> str:
        """The twin's actual `model_status`: a job's phase, "serving", or why not."""
        ...


class TwinLink:
    def __init__(
        self,
        topics: TwinTopics,
        client: MqttClient,
        actual: Callable[[], dict[str, str]],
        emit: Emit,
        state_dir: Path | None = None,
    ) -> None:
        self.topics = topics
        self.client = client
        self.actual = actual
        self.emit = emit
        self.path = None if state_dir is None else state_dir / DESIRED_FILE
        if self.path is not None:
            remove_stale_temps(self.path)  # built once at start: a leftover is a crash's
        self.desired: dict[str, str] = self._load()
        self.versions: DesiredVersions | None = None
        self._reported: dict[str, str] | None = None
        self._lock = threading.Lock()

    def attach(self, versions: DesiredVersions) -> None:
        """Hand desired versions to `versions` from now on, starting with the one kept
        from before a restart (it does nothing when that version is already served)."""
        self.versions = versions
        version = self.desired.get("model_version")
        if version:
            versions.want(version)

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read %s: %s; starting without desired values", self.path, exc)
            return {}
        try:
            doc = strict_loads(data[:MAX_TWIN_BYTES], str(self.path))
            if not isinstance(doc, dict) or len(doc) > MAX_DESIRED:
                raise TypeError(f"not an object of at most {MAX_DESIRED} values")
            return {k: twin.check_value(k, v) for k, v in doc.items()}
        except (JsonRefusedError, TypeError, twin.TwinError) as exc:
            # The cloud sends the desired values again on connect (twin get).
            log.warning("ignoring %s: %s", self.path, exc)
            return {}

    def _save(self) -> None:
        if self.path is None:
            return
        data = json.dumps(self.desired, sort_keys=True).encode()
        try:
            # 0o666 under the umask: what the plain open() it replaced gave.
            write_atomic(self.path, data, mode=0o666)
        except OSError as exc:
            log.warning("cannot keep the desired twin values in %s: %s", self.path, exc)

    def filters(self) -> list[TopicFilter]:
        return [
            TopicFilter(str(self.topics.update_delta)),
            TopicFilter(str(self.topics.get_result)),
        ]

    def handles(self, topic: str) -> bool:
        return topic in (str(self.topics.update_delta), str(self.topics.get_result))

    def on_connect(self) -> None:
        """After the link subscribed (to `filters()` too): ask for the twin, and forget
        what was reported so the next `report` (the link's, right after) sends it once."""
        with self._lock:
            self._reported = None
        try:
            self.client.publish(self.topics.get, twin.encode_get())
        except MqttError as exc:
            log.debug("twin get not sent: %s", exc)

    def stopped(self) -> None:
        """A clean stop: the twin must not go on saying `health: ready`."""
        self.report(override={"health": "stopped"})

    def report(self, force: bool = False, override: dict[str, str] | None = None) -> None:
        """Publish the actual values when they changed (or always, with `force`)."""
        values = {**self.actual(), **(override or {})}
        values = {k: _cut(v) for k, v in values.items()}
        with self._lock:
            if not force and values == self._reported:
                return
            self._reported = values
        try:
            self.client.publish(self.topics.update, twin.encode_update(values))
        except MqttError as exc:
            log.debug("twin update not sent: %s", exc)
            with self._lock:
                self._reported = None  # try again on the next change or connect

    def handle(self, payload: bytes) -> None:
        if len(payload) > MAX_TWIN_BYTES:
            log.warning(
                "ignoring a twin message of %d bytes (the limit is %d)",
                len(payload),
                MAX_TWIN_BYTES,
            )
            return
        try:
            doc = twin.decode(payload)
        except ProtocolError as exc:
            log.warning("ignoring a twin message: %s", exc.message)
            return
        desired = doc.desired()
        changed = {k: v for k, v in desired.items() if self.desired.get(k) != v}
        # The desired set lives in memory and in every retained state: bounded, so a
        # twin that names ever new properties cannot grow it without end.
        room = MAX_DESIRED - len(self.desired)
        fresh = [k for k in changed if k not in self.desired]
        if len(fresh) > room:
            dropped = sorted(fresh)[max(room, 0) :]
            log.warning(
                "twin names more than %d desired properties; ignoring %s", MAX_DESIRED,
                ", ".join(dropped[:5]),
            )  # fmt: skip
            for key in dropped:
                del changed[key]
        if not changed:
            return
        self.desired.update(changed)
        self._save()
        version = changed.get("model_version")
        if version is not None:
            current = self.actual().get("model_version", "")
            if version != current:
                how = (
                    "resolving it through the release index"
                    if self.versions is not None
                    else "recorded: no release index (update.repository) to resolve it"
                )
                self.emit(
                    EventKind.TWIN_DESIRED,
                    f"KubeEdge twin wants model_version {version} (running "
                    f"{current or 'none'}); {how}",
                    model_version=version,
                    event_id=doc.event_id,
                )
            if self.versions is not None:
                self.versions.want(version)


def _cut(value: str) -> str:
    """At most MAX_VALUE_BYTES of UTF-8, cut on a character boundary."""
    data = value.encode("utf-8", "replace")[: twin.MAX_VALUE_BYTES]
    return data.decode("utf-8", "ignore")
