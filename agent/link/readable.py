"""What `config.get` may read: the tunable keys and a fixed list of others.

A key is looked up in this table first and only then walked, field by field, through
the config dataclasses (never `getattr` on a name from the wire: no `__class__`,
no methods, no private attributes). File paths and secret references (trust keys,
credentials, TLS files, the state directory) are not readable: a console has no use
for where a device keeps them, and an attacker would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agent.link.tunables import TUNABLE
from agent.runtimes import REGISTRY

READABLE: tuple[str, ...] = (
    *TUNABLE,
    "device_id",
    "model.runtime",
    "model.preference",
    "model.validate_golden",
    # Each runtime declares the further fields of its section a console may read.
    *(f"runtimes.{name}.{f}" for name, cls in REGISTRY.items() for f in cls.readable),
    "memory.max_mb",
    "memory.soft_limit_fraction",
    "memory.check_interval_ms",
    "api.max_request_mb",
    "api.max_inflight",
    "api.max_connections",
    "api.idle_timeout_s",
    "api.max_batch_size",
    "batching.enabled",
    "batching.max_batch",
    "batching.max_wait_ms",
    "bundle_limits.max_bundle_mb",
    "bundle_limits.max_member_mb",
    "bundle_limits.max_members",
    "mqtt.host",
    "mqtt.port",
    "mqtt.protocol",
    "mqtt.keepalive_s",
    "mqtt.max_inflight",
    "mqtt.groups",
    "mqtt.tls.enabled",
    "mqtt.tls.min_version",
    "outbox.max_mb",
    "outbox.max_age_s",
    "outbox.synchronous",
    "commands.require_signature",
    "commands.max_payload_kb",
    "commands.max_lifetime_s",
    "commands.clock_skew_s",
    "commands.reply_cache_size",
    "commands.reply_cache_age_s",
    "commands.log_lines",
    "kubeedge.enabled",
    "kubeedge.namespace",
)
_READABLE = frozenset(READABLE)


class UnreadableKeyError(KeyError):
    """A key that is not in READABLE (or does not exist)."""


def read(config: Any, key: object) -> Any:
    """The JSON value of one readable key; UnreadableKeyError for anything else."""
    if not isinstance(key, str) or key not in _READABLE:
        raise UnreadableKeyError(key)
    value = config
    for part in key.split("."):
        names = {f.name for f in dataclasses.fields(value)}
        if part not in names:
            raise UnreadableKeyError(key)
        value = getattr(value, part)
    return _plain(value)


def read_all(config: Any) -> dict[str, Any]:
    """Every readable key, nested by section as in agent.toml."""
    out: dict[str, Any] = {}
    for key in READABLE:
        *sections, leaf = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = read(config, key)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
