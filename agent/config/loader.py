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
from agent.config.typed import (
    SYNTAX,
    UNREADABLE,
    ConfigError,
    ConfigIssue,
    build,
    coerce_env,
)
from agent.regular_files import read_regular
from agent.signing import KeyFileError, parse_public_key

log = logging.getLogger(__name__)

ENV_PREFIX = "EDGERUN_"
CREDENTIAL_PREFIX = "credential:"
# An agent.toml is a few KiB; a key or credential a few hundred bytes. The caps keep a
# wrong path (a disk image, /dev/zero) from filling memory.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CREDENTIAL_BYTES = 64 * 1024
# No setting is nested more than 4 tables deep; TOML nested far deeper is refused
# before anything walks it (and tomllib's own recursion is caught as well).
MAX_DEPTH = 16

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
            shown = printable(name)
            issues.append(
                ConfigIssue(
                    printable(".".join(path)), f"environment variable {shown} names no setting"
                )
            )
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = coerce_env(tp, text)
    return data, issues


def reason(exc: BaseException) -> str:
    """What went wrong with a file, without the errno noise."""
    return str(getattr(exc, "strerror", None) or exc)


def printable(text: str) -> str:
    """`text` with undecodable bytes (surrogate escapes from os.environ) as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _depth(data: Any) -> int:
    """How deeply tables and arrays nest in `data` (iteratively: the input is hostile)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        if isinstance(node, Mapping):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest


def parse_toml(raw: bytes, source: str) -> dict[str, Any]:
    """TOML bytes to a dict, or ConfigError(config.unreadable | config.syntax)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue("", f"not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})")],
            source,
            UNREADABLE,
        ) from exc
    # Some editors start a UTF-8 file with a byte-order mark, which TOML does not allow.
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"not valid TOML: {exc}")], source, SYNTAX) from exc
    except RecursionError as exc:
        raise ConfigError([_too_deep()], source, SYNTAX) from exc
    if _depth(data) > MAX_DEPTH:
        raise ConfigError([_too_deep()], source, SYNTAX)
    return data


def _too_deep() -> ConfigIssue:
    return ConfigIssue(
        "", f"tables or arrays are nested more than {MAX_DEPTH} levels deep; no setting is"
    )


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
    env = os.environ if environ is None else environ
    overrides, unknown = env_overrides(env)
    for issue in unknown:
        log.warning("ignoring %s", issue.message)
    merged = _merge(dict(data), overrides)
    try:
        return build(AgentConfig, merged, source)
    except ConfigError as exc:
        raise _blame_environment(exc, env) from None


def _blame_environment(exc: ConfigError, environ: Mapping[str, str]) -> ConfigError:
    """Say which EDGERUN_* variable set a bad value: it is not in the file to be found."""
    names: dict[str, str] = {}
    for var in environ:
        if var.startswith(ENV_PREFIX) and var != "EDGERUN_CONFIG":
            names[".".join(p.lower() for p in var[len(ENV_PREFIX) :].split("__"))] = var
    if not names:
        return exc
    issues = []
    for issue in exc.issues:
        name = names.get(issue.path.split("[", 1)[0])
        message = issue.message if name is None else f"{issue.message} (set by {printable(name)})"
        issues.append(ConfigIssue(issue.path, message))
    return ConfigError(issues, exc.source, exc.code)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load a TOML file (or defaults when `path` is None) plus environment overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = read_regular(Path(path), MAX_CONFIG_BYTES)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                [ConfigIssue("", f"cannot read file: {reason(exc)}")], source, UNREADABLE
            ) from exc
        data = parse_toml(raw, source)
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
        return read_regular(path, MAX_CREDENTIAL_BYTES)
    except (OSError, ValueError) as exc:
        raise ConfigError([ConfigIssue(value, f"cannot read {path}: {reason(exc)}")]) from exc
