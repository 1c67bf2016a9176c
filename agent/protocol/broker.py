"""Helpers both MQTT wrappers share (the agent's `agent.link.client`, the console's
`fleet.mqtt`): what a connect error means to a person, callbacks that cannot break
paho's loop, TCP_NODELAY, and the paho lock that orders an ack callback's registration
before its PUBACK. No paho import here: a paho client is passed in.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def describe_connect_error(exc: BaseException) -> str:
    """Why a connection to the broker failed, in words an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running, on this port?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def call_safely(fn: Callable[..., None], *args: Any) -> None:
    """Run a user callback on paho's thread: its exception is logged, never raised into
    the network loop (which would drop the connection)."""
    try:
        fn(*args)
    except Exception:
        log.exception("MQTT callback %r failed", fn)


def no_delay(client: Any) -> None:
    """TCP_NODELAY on a connected paho client's socket. paho leaves Nagle on: a reply
    written right after a PUBACK would wait for the peer's delayed ACK (~40 ms on
    Linux); commands and replies are small and interactive."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("cannot set TCP_NODELAY: %s", exc)


def ack_lock(client: Any, error: Callable[[str], Exception]) -> Any:
    """paho's `_out_message_mutex`: held while paho matches a PUBACK and calls on_publish,
    so registering an ack callback under it cannot miss a fast PUBACK. A paho release
    that renamed it raises `error(message)` rather than lose acks."""
    lock = getattr(client, "_out_message_mutex", None)
    if lock is None:
        raise error("this paho-mqtt has no _out_message_mutex; edgerun needs paho-mqtt 2.x")
    return lock


__all__ = ["ack_lock", "call_safely", "describe_connect_error", "no_delay"]
