"""The run-time tunable subset of the config, for `config.get` / `config.set`.

AgentConfig is frozen: a change builds a new config with `dataclasses.replace` and
applies it to the running parts. Values are checked with the same bounds as in
agent.toml (the field's own `constraint`). Changes last until the agent restarts;
agent.toml stays the source of truth.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import typing
from collections.abc import Callable, Mapping
from typing import Any

from agent.admission import REFUSALS
from agent.config.model import AgentConfig
from agent.config.typed import ConfigError, build
from agent.memory import compute_budget
from agent.protocol.events import EventKind
from agent.protocol.messages import Code
from agent.runtimes import REGISTRY
from agent.serving import SwapConflictError

log = logging.getLogger(__name__)

# What can change while the agent runs; anything else is refused by name.
# Each runtime declares its own tunable fields (Runtime.tunable).
TUNABLE = (
    "telemetry.interval_s",
    "log_level",
    *(f"runtimes.{name}.{f}" for name, cls in REGISTRY.items() for f in cls.tunable),
    "memory.soft_limit_mb",
    "batching.enabled",
    "batching.max_batch",
    "batching.max_wait_ms",
)


class TunableError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def get_path(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def replace_path(config: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: replace_path(getattr(config, head), rest, value)})


def _section_class(path: str) -> tuple[type[Any], str]:
    cls: Any = AgentConfig
    parts = path.split(".")
    for part in parts[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls, parts[-1]


def validate(path: str, value: Any) -> Any:
    """The value as the config would hold it, or TunableError naming the key."""
    cls, leaf = _section_class(path)
    try:
        section = build(cls, {leaf: value}, source="config.set")
    except ConfigError as exc:
        issue = exc.issues[0]
        raise TunableError(Code.INVALID_VALUE, f"{path}: {issue.message}") from exc
    return getattr(section, leaf)


class Tunables:
    """Holds the effective config and applies run-time changes to the agent."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.effective: AgentConfig = agent.config
        self._lock = threading.Lock()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    @property
    def telemetry_interval_s(self) -> float:
        return float(self.effective.telemetry.interval_s)

    def on_change(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(fn)

    def values(self) -> dict[str, Any]:
        return {path: get_path(self.effective, path) for path in TUNABLE}

    def set(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Check every change first, then apply them all; returns the new values."""
        if not changes:
            raise TunableError(Code.BAD_ARGS, "nothing to set: pass {key: value}")
        for key in changes:
            if key not in TUNABLE:
                raise TunableError(
                    Code.NOT_TUNABLE,
                    f"{key} cannot be changed at run time (tunable: {', '.join(TUNABLE)}); "
                    "change agent.toml and restart",
                )
        checked = {key: validate(key, value) for key, value in changes.items()}
        with self._lock:
            old = self.effective
            new = old
            for key, value in checked.items():
                new = replace_path(new, key, value)
            self._apply(old, new)
            self.effective = new
        applied = {key: get_path(new, key) for key in checked}
        log.info("config.set applied %s", applied)
        for fn in list(self._listeners):
            try:
                fn(applied)
            except Exception:
                log.exception("tunables listener %r failed", fn)
        return applied

    def _apply(self, old: AgentConfig, new: AgentConfig) -> None:
        agent = self.agent
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level.upper())
        if new.memory != old.memory:
            budget = agent.budget
            fresh = compute_budget(
                new.memory,
                cgroup_bytes=budget.cgroup_bytes,
                physical_bytes=budget.physical_bytes,
                detect_cgroup=False,
            )
            agent.budget = fresh
            agent.watcher.budget = fresh
            agent.admission.budget = fresh
            agent.watcher.sample()
        if new.runtimes != old.runtimes:
            self._reload_runtime(new)
        if new.batching != old.batching:
            # Same model, same runtime: a new generation with (or without) a batcher;
            # requests queued in the old batcher still run.
            agent.host.set_batching(new.batching)

    def _reload_runtime(self, new: AgentConfig) -> None:
        """Thread counts are fixed when a runtime opens a model: open the served one
        again and swap it in through the host, which closes the old runtime when the
        last request still running on it lets go (never under it)."""
        agent = self.agent
        previous = agent.admission.config
        agent.admission.config = dataclasses.replace(previous, runtimes=new.runtimes)
        current = agent.host.model
        if current is None:
            return
        generation = agent.host.generation
        try:
            fresh = agent.admission.open(current.directory, current.sha256, current.manifest)
        except REFUSALS as exc:
            agent.admission.config = previous
            raise TunableError(
                Code.INVALID_VALUE, f"the model does not load with the new threads: {exc}"
            ) from exc
        try:
            agent.host.swap(fresh, replacing=generation)
        except SwapConflictError as exc:
            # A model install won the race; it was opened with the new config already.
            fresh.runtime.close()
            log.info("config.set: %s; not swapping the reopened runtime", exc)
            return
        agent.events.emit(
            EventKind.MODEL_RELOADED,
            f"reopened {fresh.manifest.name} {fresh.manifest.version} with new runtime threads",
            runtime=fresh.runtime.describe(),
        )
