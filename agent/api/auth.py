"""Who may call the local API: a bearer token on TCP listeners, file modes on the socket.

The Unix socket is guarded by its owner, group and mode (`api.socket_group`,
`api.socket_mode`). A TCP listener has no such guard, so one bound beyond loopback
needs `api.token`; the agent refuses to start without it. When a token is set,
every TCP request but the health probes must carry `Authorization: Bearer TOKEN`
(health stays open so a load balancer or kubelet can probe without a secret; it
reveals nothing but "up" and "ready").
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping

from agent.api.http import InvalidTokenError, UnauthorizedError
from agent.config.loader import ConfigError, read_credential
from agent.config.model import ApiConfig

MIN_TOKEN_BYTES = 16
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_CHALLENGE = 'Bearer realm="edgerun"'


class ApiSetupError(Exception):
    """The API cannot start as configured; the message names the key to fix."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def tcp_host(config: ApiConfig) -> str:
    return config.tcp.rpartition(":")[0].strip("[]")


def load_token(config: ApiConfig, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The bearer token, or None when none is configured; raises ApiSetupError when the
    configuration exposes the API without one or the token cannot be read."""
    if not config.token:
        if config.tcp and not is_loopback(tcp_host(config)):
            raise ApiSetupError(
                f"api.tcp = {config.tcp!r} listens beyond loopback and api.token is not set: "
                "anyone who reaches that address could run inference. Set api.token = "
                '"credential:api-token" (systemd LoadCredential=api-token:/etc/edgerun/'
                "api-token) or bind api.tcp to 127.0.0.1"
            )
        return None
    try:
        token = read_credential(config.token, environ).strip()
    except ConfigError as exc:
        why = "; ".join(issue.message for issue in exc.issues)
        raise ApiSetupError(f"api.token = {config.token!r}: {why}") from exc
    if len(token) < MIN_TOKEN_BYTES:
        raise ApiSetupError(
            f"api.token {config.token!r} holds {len(token)} bytes; use at least "
            f"{MIN_TOKEN_BYTES} random bytes (e.g. `openssl rand -hex 32`)"
        )
    if any(b < 0x21 or b > 0x7E for b in token):
        raise ApiSetupError(
            f"api.token {config.token!r} must be printable ASCII without spaces "
            "(it travels in an HTTP header)"
        )
    return token


class TokenCheck:
    """Checks the Authorization header of a TCP request in constant time."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token

    def check(self, path: str, headers: Mapping[str, str]) -> None:
        if path in OPEN_PATHS:
            return
        given = headers.get("authorization")
        if given is None:
            raise UnauthorizedError(
                "this endpoint needs Authorization: Bearer TOKEN (the token of api.token)",
                {"www-authenticate": _CHALLENGE},
            )
        # compare_digest takes as long for any wrong token of a given length.
        if not hmac.compare_digest(given.encode("latin-1"), self._expected):
            raise InvalidTokenError(
                "the bearer token is not the one in api.token",
                {"www-authenticate": f'{_CHALLENGE}, error="invalid_token"'},
            )
