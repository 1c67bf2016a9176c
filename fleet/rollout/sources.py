"""Where devices fetch the bundle from during a rollout: the deploy's `url` or `transfer`.

The engine asks a `DeploySource` for each device's source; the console's real ones wrap
`fleet.bundle_source` (an HTTP server it starts for the bundle, or chunks over MQTT).
They are built on first use (a rollout resumed only to roll back never serves the
bundle), and each checks that the file is still the one the rollout recorded.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol.update import HttpSource, MqttSource, Source
from fleet.errors import FleetCode, FleetError
from fleet.rollout.bundle import BundleInfo


class DeploySource(Protocol):
    def source_for(self, device: str) -> Source:
        """FleetError when the device cannot be served (MQTT: the broker refused the
        need subscription); the engine fails that device without sending its deploy."""
        ...

    def done(self, device: str) -> None:
        """The device's job ended: stop serving it (MQTT chunks)."""
        ...

    def close(self) -> None: ...


SourceFactory = Callable[[str, BundleInfo], DeploySource]


def _same(bundle: BundleInfo, sha256: str) -> None:
    if sha256 != bundle.sha256:
        raise FleetError(
            FleetCode.BUNDLE,
            f"{bundle.path} is not the bundle this rollout deploys (sha256 {sha256[:16]}…, "
            f"the rollout's is {bundle.sha256[:16]}…); give the right file with --bundle-path",
        )


class HttpDeploySource:
    """One HTTP server for the bundle; every device gets the same URL."""

    def __init__(self, bundle: BundleInfo, host: str, keys: Sequence[Ed25519PublicKey]) -> None:
        from fleet.bundle_source import HttpBundleSource

        self._server = HttpBundleSource(Path(bundle.path), host, trust=keys)
        try:
            _same(bundle, self._server.info.sha256)
        except FleetError:
            self._server.close()
            raise
        self.url: str = self._server.url

    def source_for(self, device: str) -> Source:
        return HttpSource(self.url)

    def done(self, device: str) -> None:
        pass

    def close(self) -> None:
        self._server.close()


class MqttDeploySource:
    """Chunks over MQTT: one transfer per device (its need messages drive the sender)."""

    def __init__(self, bundle: BundleInfo, client: Any, keys: Sequence[Ed25519PublicKey]) -> None:
        from fleet.bundle_source import MqttBundleSource

        # The FleetClient subscribes the need topics: it checks each SUBACK (a refused
        # one fails that device at once) and subscribes them again after a reconnect.
        self._source = MqttBundleSource(
            client.paho, Path(bundle.path), trust=keys, subscriber=client
        )
        _same(bundle, self._source.info.sha256)

    def source_for(self, device: str) -> Source:
        return MqttSource(self._source.transfer_for(device))

    def done(self, device: str) -> None:
        self._source.done(device)

    def close(self) -> None:
        self._source.close()


def reachable_host(broker_host: str, broker_port: int) -> str:
    """The address of this machine on the route to the broker: the devices reach the
    broker, so they reach the console's bundle server at that address too."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((broker_host, broker_port))  # UDP: sends nothing, picks the route
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def console_sources(client: Any, http_host: str, keys: Sequence[Ed25519PublicKey]) -> SourceFactory:
    """The console's sources: `client` is the FleetClient (its paho client carries the
    chunks), `http_host` the address the HTTP server binds and advertises."""

    def make(via: str, bundle: BundleInfo) -> DeploySource:
        if via == "mqtt":
            return MqttDeploySource(bundle, client, keys)
        return HttpDeploySource(bundle, http_host, keys)

    return make
