"""Where devices fetch a bundle the console deploys: `deploy --via http|mqtt`.

    source = HttpBundleSource(Path("digits-2.0.0.edgebundle"), trust=[pub])
    args = source.deploy_args()             # DeployRequest(...).to_args(): url, sha256, ...
    ...
    source.close()

    source = MqttBundleSource(client.paho, Path("digits-2.0.0.edgebundle"), trust=[pub],
                              subscriber=client)  # the FleetClient: checked SUBACKs
    tid = source.transfer_for("press-17")   # a ChunkSender answers that device's needs
    args = source.deploy_args(transfer=tid)
    source.close()                          # stops every sender

Both verify the bundle first, as `fleet/releases.py` does (the signed manifest gives
name and version; sha256 and size come from the file), so a bundle no device would
accept is refused here (console.bundle) before any device is touched. The HTTP
server serves that one file only (GET/HEAD, single byte ranges so a device resumes
a cut download), answers 404 to every other path, and bounds the connections it
serves at once (the rest wait in the listen backlog).
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundle import BundleError, verify_bundle
from agent.protocol.update import DeployRequest, HttpSource, MqttSource, Source, TrialSpec
from fleet.errors import FleetCode, FleetError
from fleet.mqtt import RESUBSCRIBE_AFTER_S
from fleet.transfer import ChunkSender

if TYPE_CHECKING:
    from fleet.mqtt import Message

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # served at once; more wait in the backlog
BLOCK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    name: str
    version: str
    sha256: str
    size: int

    def request(self, source: Source, **extra: Any) -> DeployRequest:
        return DeployRequest(
            source=source,
            sha256=self.sha256,
            size=self.size,
            version=self.version,
            name=self.name,
            **extra,
        )


def inspect_bundle(path: Path, trust: Iterable[Ed25519PublicKey]) -> BundleInfo:
    """Verify `path` with the trusted keys; FleetError(console.bundle) when it fails."""
    path = Path(path)
    keys = list(trust)
    if not keys:
        raise FleetError(
            FleetCode.BUNDLE,
            f"{path}: no trusted bundle key to verify it with (set the release public key)",
        )
    try:
        verified = verify_bundle(path, keys)
        size = path.stat().st_size
    except BundleError as exc:
        raise FleetError(
            FleetCode.BUNDLE,
            f"{path} does not verify: {exc}; no device would accept it",
            bundle_code=getattr(exc, "code", None),
        ) from None
    except OSError as exc:
        raise FleetError(FleetCode.BUNDLE, f"cannot read {path}: {exc.strerror}") from None
    return BundleInfo(
        path, verified.manifest.name, verified.manifest.version, verified.sha256, size
    )


def _deploy_args(info: BundleInfo, source: Source, extra: dict[str, Any]) -> dict[str, Any]:
    trial = extra.pop("trial", None)
    if isinstance(trial, dict):
        extra["trial"] = TrialSpec(**trial)
    elif trial is not None:
        extra["trial"] = trial
    return info.request(source, **extra).to_args()


# --------------------------------------------------------------------------- HTTP


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a wave of devices arriving at once waits, not refused

    def __init__(self, address: tuple[str, int], source: HttpBundleSource) -> None:
        self.source = source
        self.slots = threading.BoundedSemaphore(source.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded: at most max_connections handler threads at once.
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("bundle server: %s", format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        source = self.server.source
        if unquote(urlsplit(self.path).path) != source.url_path_unquoted:
            self._plain(404, "not found: this server serves one bundle only\n")
            return
        size = source.info.size
        start, end = 0, size - 1
        status = 200
        header = self.headers.get("Range")
        if header:
            parsed = _parse_range(header, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        source.served += 1
        with contextlib.suppress(ConnectionError, TimeoutError), source.info.path.open("rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                block = f.read(min(BLOCK, left))
                if not block:
                    break
                self.wfile.write(block)
                left -= len(block)

    def _plain(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range inside the file; None otherwise."""
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # the last n bytes
        n = int(m.group(2))
        return (max(0, size - n), size - 1) if n > 0 else None
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class HttpBundleSource:
    """A small threaded HTTP server for one bundle, for the length of a rollout."""

    def __init__(
        self,
        path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        trust: Iterable[Ed25519PublicKey] = (),
        advertise: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """`advertise`: the host devices reach this server by (default: `host`)."""
        self.info = inspect_bundle(path, trust)
        self.max_connections = max_connections
        self.served = 0
        self.url_path_unquoted = f"/{self.info.sha256[:16]}/{self.info.path.name}"
        try:
            self._server = _Server((host, port), self)
        except OSError as exc:
            raise FleetError(
                FleetCode.BAD_INPUT, f"cannot serve the bundle on {host}:{port}: {exc.strerror}"
            ) from None
        bound_port = self._server.server_address[1]
        shown = advertise or host
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{bound_port}{quote(self.url_path_unquoted)}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bundle-http", daemon=True
        )
        self._thread.start()

    def deploy_args(self, **extra: Any) -> dict[str, Any]:
        """The deploy's arguments (DeployRequest.to_args) for this bundle at `url`;
        `extra`: mode, shadow, trial (a TrialSpec or its fields), allow_downgrade, force."""
        return _deploy_args(self.info, HttpSource(self.url), dict(extra))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> HttpBundleSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- MQTT


class NeedSubscriber(Protocol):
    """Subscribes the senders' need topics for the source (fleet.mqtt.FleetClient is
    one): `subscribe` waits for the SUBACK, raises FleetError(console.
    broker_unreachable) when the broker refuses it or does not answer in time, and
    subscribes again after every reconnect (a refusal then is asked for again, then
    logged: that transfer stalls and its device ends as a device timeout)."""

    def subscribe(
        self,
        filter: str,
        callback: Callable[[Message], None],
        qos: int = 1,
        timeout_s: float | None = None,
    ) -> None: ...

    def unsubscribe(self, filter: str) -> None: ...


# A refused or unanswered SUBSCRIBE is tried again after the pauses the FleetClient
# uses after a connect (a broker starved of CPU answers late, or refuses a QoS-1
# subscription it cannot set up yet).
SUBSCRIBE_BACKOFF_S = RESUBSCRIBE_AFTER_S


class MqttBundleSource:
    """One `ChunkSender` per device (fleet/transfer.py) on the console's paho client."""

    def __init__(
        self,
        client: Any,
        path: Path,
        *,
        trust: Iterable[Ed25519PublicKey] = (),
        subscriber: NeedSubscriber | None = None,
    ) -> None:
        """`client`: a connected paho client whose loop runs (FleetClient.paho); the
        chunks go out on it. `subscriber` (the FleetClient): subscribes each device's
        need topic, so a refused subscription fails `transfer_for` before the deploy is
        sent and a reconnect does not forget it. Without one, each sender subscribes on
        `client` itself, unchecked."""
        self.info = inspect_bundle(path, trust)
        self.client = client
        self.subscriber = subscriber
        self._data = self.info.path.read_bytes()
        self._chunks: list[Any] | None = None
        self._senders: dict[str, ChunkSender] = {}
        self._lock = threading.Lock()

    def transfer_for(self, device: str) -> str:
        """Start serving `device` (idempotent); returns its transfer id. With a
        subscriber: FleetError(console.broker_unreachable) when the broker would not
        take the need subscription (the device is not served; nothing to undo)."""
        # Held while subscribing (seconds at worst): one owner of the senders, and a
        # second call for the same device waits for the first one's answer.
        with self._lock:
            sender = self._senders.get(device)
            if sender is not None:
                return sender.transfer_id
            tid = f"t{uuid.uuid4().hex[:16]}"
            sender = ChunkSender(self.client, device, tid, self._data)
            # One copy of the chunks for every device: a wave of 1,000 devices must
            # not hold 1,000 copies of the bundle.
            if self._chunks is None:
                self._chunks = sender.chunks
            sender.chunks = self._chunks
            if self.subscriber is None:
                sender.start()
            else:
                self._subscribe(self.subscriber, device, sender)
            self._senders[device] = sender
            return sender.transfer_id

    def _subscribe(self, subscriber: NeedSubscriber, device: str, sender: ChunkSender) -> None:
        topic = sender.need_topic

        def on_need(message: Message) -> None:
            sender.handle_need(message.payload)

        attempts = len(SUBSCRIBE_BACKOFF_S) + 1
        for attempt in range(1, attempts + 1):
            try:
                subscriber.subscribe(topic, on_need, qos=1)
                return
            except FleetError as exc:
                if exc.code is not FleetCode.BROKER:
                    raise
                if attempt < attempts:
                    pause = SUBSCRIBE_BACKOFF_S[attempt - 1]
                    log.warning(
                        "need subscription for %s, attempt %d of %d, failed (%s); again in %g s",
                        device, attempt, attempts, exc.message, pause,
                    )  # fmt: skip
                    time.sleep(pause)
                    continue
                # A late SUBACK may still grant it on the broker: take it back.
                with contextlib.suppress(Exception):
                    subscriber.unsubscribe(topic)
                raise FleetError(
                    FleetCode.BROKER,
                    f"cannot serve the bundle to {device} over MQTT: {attempts} attempts to "
                    f"subscribe to {topic} failed, the last with: {exc.message}. The device "
                    "would never get its chunks, so no deploy was sent; check the broker's "
                    "ACL for the console user (it must subscribe to "
                    "edgerun/v1/+/bundle/+/need) and its load",
                ) from None

    def deploy_args(self, transfer: str, **extra: Any) -> dict[str, Any]:
        return _deploy_args(self.info, MqttSource(transfer), dict(extra))

    def done(self, device: str) -> None:
        """Stop serving one device (its job ended)."""
        with self._lock:
            sender = self._senders.pop(device, None)
        if sender is not None:
            self._stop(sender)

    def _stop(self, sender: ChunkSender) -> None:
        if self.subscriber is None:
            sender.stop()
        else:
            self.subscriber.unsubscribe(sender.need_topic)

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            with contextlib.suppress(Exception):  # the client may be gone already
                self._stop(sender)

    def __enter__(self) -> MqttBundleSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BundleInfo",
    "HttpBundleSource",
    "MqttBundleSource",
    "NeedSubscriber",
    "inspect_bundle",
]
