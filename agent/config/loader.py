"""Read agent.toml, apply EDGERUN_* environment overrides and resolve credentials."""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config.model import AgentConfig
from agent.config.typed import ConfigError, ConfigIssue, build, coerce_env
from agent.signing import KeyFileError, parse_public_key

log = logging.getLogger(__name__)

ENV_PREFIX = "EDGERUN_"
CREDENTIAL_PREFIX = "credential:"

__all__ = ["ConfigError", "ConfigIssue", "load_config", "parse_config", "read_credential"]


def _field_type(path: list[str]) -> Any:
    """Type of the config field at `path`, or None if no such field exists."""
    cls: Any = AgentConfig
    tp: Any = None
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        tp = hints[part]
        cls = tp
    return tp


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[ConfigIssue]]:
    """EDGERUN_MEMORY__MAX_MB=256 sets memory.max_mb; `__` separates table levels.

    Returns the overrides and the EDGERUN_* names that match no setting. Those are
    warnings, not errors: other tools share the prefix (EDGERUN_CONFIG, build caches),
    and a stray variable must not stop a device. check-config prints them.
    """
    data: dict[str, Any] = {}
    issues: list[ConfigIssue] = []
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "EDGERUN_CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        tp = _field_type(path)
        if tp is None or dataclasses.is_dataclass(tp):
            issues.append(
                ConfigIssue(".".join(path), f"environment variable {name} names no setting")
            )
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = coerce_env(tp, text)
    return data, issues


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_config(
    data: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    source: str = "config",
) -> AgentConfig:
    overrides, unknown = env_overrides(os.environ if environ is None else environ)
    for issue in unknown:
        log.warning("ignoring %s", issue.message)
    merged = _merge(dict(data), overrides)
    return build(AgentConfig, merged, source)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load a TOML file (or defaults when `path` is None) plus environment overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(
                [ConfigIssue("", f"cannot read file: {exc.strerror}")], source
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([ConfigIssue("", f"not valid TOML: {exc}")], source) from exc
    return parse_config(data, environ, source)


def read_public_keys(
    refs: list[str], key: str, environ: Mapping[str, str] | None = None
) -> list[Ed25519PublicKey]:
    """Load PEM ed25519 public keys given as paths or "credential:NAME"; problems are
    reported against `key[i]` (e.g. trust.public_keys[0])."""
    keys = []
    for i, ref in enumerate(refs):
        path = f"{key}[{i}]"
        try:
            keys.append(parse_public_key(read_credential(ref, environ), origin=ref))
        except ConfigError as exc:
            raise ConfigError([ConfigIssue(path, issue.message) for issue in exc.issues]) from exc
        except KeyFileError as exc:
            raise ConfigError([ConfigIssue(path, str(exc))]) from exc
    return keys


def read_credential(value: str, environ: Mapping[str, str] | None = None) -> bytes:
    """Resolve "credential:NAME" from $CREDENTIALS_DIRECTORY (systemd LoadCredential=).

    Any other value is taken as a file path.
    """
    env = os.environ if environ is None else environ
    if value.startswith(CREDENTIAL_PREFIX):
        name = value[len(CREDENTIAL_PREFIX) :]
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                [ConfigIssue(value, "CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)")]
            )
        if "/" in name or name in ("", ".", ".."):
            raise ConfigError([ConfigIssue(value, "credential name must be a plain file name")])
        path = Path(directory) / name
    else:
        path = Path(value)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue(value, f"cannot read {path}: {exc.strerror}")]) from exc
