"""Where devices fetch the bundle from during a rollout: the deploy's `url` or `transfer`.

The engine asks a `DeploySource` for each device's source; the console's real ones wrap
`fleet.bundle_source` (an HTTP server it starts for the bundle, or chunks over MQTT).
They are built on first use: a rollout resumed only to roll back never serves a bundle.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from agent.protocol.update import HttpSource, MqttSource, Source
from fleet.rollout.bundle import BundleInfo


class DeploySource(Protocol):
    def source_for(self, device: str) -> Source: ...

    def close(self) -> None: ...


SourceFactory = Callable[[str, BundleInfo], DeploySource]


class HttpDeploySource:
    """One HTTP server for the bundle; every device gets the same URL."""

    def __init__(self, bundle: BundleInfo, host: str) -> None:
        from fleet.bundle_source import HttpBundleSource

        self._server = HttpBundleSource(bundle.path, host)
        self.url: str = self._server.url

    def source_for(self, device: str) -> Source:
        return HttpSource(self.url)

    def close(self) -> None:
        self._server.close()


class MqttDeploySource:
    """Chunks over MQTT: one transfer id per device (its need messages drive the sender)."""

    def __init__(self, bundle: BundleInfo, client: Any) -> None:
        from fleet.bundle_source import MqttBundleSource

        self._source = MqttBundleSource(client, bundle.path)

    def source_for(self, device: str) -> Source:
        return MqttSource(self._source.transfer_for(device))

    def close(self) -> None:
        self._source.close()


def reachable_host(broker_host: str, broker_port: int) -> str:
    """The address of this machine that the broker's side of the network sees: the
    devices reach the broker, so they reach the console at that address too."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((broker_host, broker_port))  # UDP: sends nothing, picks the route
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def console_sources(client: Any, http_host: str) -> SourceFactory:
    def make(via: str, bundle: BundleInfo) -> DeploySource:
        if via == "mqtt":
            return MqttDeploySource(bundle, client)
        return HttpDeploySource(bundle, http_host)

    return make
