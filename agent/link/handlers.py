"""What each command does. The table built here is also what the link subscribes to."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.api.kserve import decode_request, encode_response
from agent.link.commands import Args, CommandError, CommandSpec
from agent.link.logring import LogRing
from agent.link.readable import READABLE, UnreadableKeyError, read, read_all
from agent.link.tunables import TUNABLE, TunableError, Tunables
from agent.protocol.messages import Code, dumps, loads, shown
from agent.protocol.update import DeployRequest, RollbackRequest
from agent.update.errors import UpdateCode, UpdateError
from agent.update.ports import UpdateService

log = logging.getLogger(__name__)

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}  # fmt: skip


def config_as_json(config: Any) -> Any:
    """A config dataclass as plain JSON data (paths as strings)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_as_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [config_as_json(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def _output_names(outputs: Any) -> list[str] | None:
    """KServe v2 `outputs`: [{"name": ...}, ...] selects outputs; absent means all."""
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise CommandError(Code.BAD_ARGS, 'infer: "outputs" must be a list of {"name": ...}')
    return [o["name"] for o in outputs]


DEPLOY_ARGS = ("url", "transfer", "sha256", "size", "version", "name", "mode", "shadow", "trial",
               "allow_downgrade", "force")  # fmt: skip
ROLLBACK_ARGS = ("version",)


def build_table(
    agent: Any,
    tunables: Tunables,
    logs: LogRing,
    link_status: Callable[[], dict[str, Any]],
    updates: UpdateService | None = None,
    signed: bool = True,
) -> dict[str, CommandSpec]:
    def ping(args: Args) -> dict[str, Any]:
        return {"pong": True, "device_id": agent.config.device_id,
                "agent_version": __version__, "time": time.time()}  # fmt: skip

    def status(args: Args) -> dict[str, Any]:
        return {**agent.status(), "link": link_status()}

    def config_get(args: Args) -> dict[str, Any]:
        keys = args.strings("keys")
        effective = tunables.effective
        if keys is None:
            return {"tunable": tunables.values(), "config": read_all(effective)}
        if len(keys) > len(READABLE):
            raise CommandError(
                Code.BAD_ARGS, f"config.get: at most {len(READABLE)} keys, got {len(keys)}"
            )
        values = {}
        for key in keys:
            try:
                values[key] = read(effective, key)
            except UnreadableKeyError:
                raise CommandError(
                    Code.BAD_ARGS,
                    f"config.get: {shown(key)} is not a readable setting "
                    "(see config.get without keys, or docs/mqtt.md)",
                ) from None
        return {"values": values}

    def config_set(args: Args) -> dict[str, Any]:
        values = args.mapping("values")
        for key in values:
            if key not in TUNABLE:  # named here, escaped: the key came from the wire
                raise CommandError(
                    Code.NOT_TUNABLE,
                    f"config.set: {shown(key)} cannot be changed at run time "
                    f"(tunable: {', '.join(TUNABLE)}); change agent.toml and restart",
                )
        try:
            applied = tunables.set(values)
        except TunableError as exc:
            raise CommandError(exc.code, exc.message) from exc
        return {"applied": applied}

    def infer(args: Args) -> dict[str, Any]:
        model = agent.host.model
        name = args.string("model") or (model.manifest.name if model is not None else "")
        request = {"inputs": args.raw("inputs")}
        outputs = args.raw("outputs")
        if outputs is not None:
            request["outputs"] = outputs
        # The same decoder and checks as the local KServe v2 API.
        _, feeds = decode_request(dumps(request), None)
        served, result = agent.host.infer(name, feeds)
        wanted = _output_names(outputs)
        unknown = [n for n in wanted or [] if n not in result]
        if unknown:
            raise CommandError(Code.BAD_ARGS, f"infer: model has no output {unknown[0]!r}")
        body, _ = encode_response(
            served.manifest.name, served.manifest.version, None, result, {"*": False}, wanted
        )
        response: dict[str, Any] = loads(body)
        return response

    def logs_cmd(args: Args) -> dict[str, Any]:
        lines = args.integer("lines", 100, 1, logs.capacity)
        level = args.string("level", "debug", choices=LOG_LEVELS)
        assert level is not None
        return {"lines": logs.tail(lines, LOG_LEVELS[level])}

    def refused(exc: UpdateError) -> CommandError:
        return CommandError(exc.code, exc.message)

    def need_updates() -> UpdateService:
        if updates is None:
            raise CommandError(UpdateCode.DISABLED, "this agent has no update service")
        return updates

    def downgrade_needs_signature(what: str) -> None:
        # A downgrade is what an attacker on the broker would send: only a signed one.
        if not signed:
            raise CommandError(
                UpdateCode.BAD_ARGS,
                f"{what} needs signed commands, and this device accepts unsigned ones "
                "(commands.require_signature = false)",
            )

    def deploy(args: Args) -> dict[str, Any]:
        service = need_updates()
        try:
            request = DeployRequest.from_args(args.values)
        except UpdateError as exc:
            raise refused(exc) from None
        if request.allow_downgrade or request.force:
            downgrade_needs_signature('deploy with "allow_downgrade" or "force"')
        try:
            return service.deploy(request)
        except UpdateError as exc:
            raise refused(exc) from None

    def rollback(args: Args) -> dict[str, Any]:
        service = need_updates()
        try:
            request = RollbackRequest.from_args(args.values)
        except UpdateError as exc:
            raise refused(exc) from None
        downgrade_needs_signature("rollback")
        try:
            return service.rollback(request)
        except UpdateError as exc:
            raise refused(exc) from None

    def update_status(args: Args) -> dict[str, Any]:
        return need_updates().status()

    def update_cancel(args: Args) -> dict[str, Any]:
        try:
            return need_updates().cancel()
        except UpdateError as exc:
            raise refused(exc) from None

    specs = [
        CommandSpec("ping", "answer at once: is the device there?", (), ping),
        CommandSpec("status", "agent status: model, memory, runtimes, link", (), status),
        CommandSpec("config.get", "effective config and the tunable values", ("keys",), config_get),
        CommandSpec("config.set", "change tunable settings until restart", ("values",), config_set),
        CommandSpec("infer", "one small KServe v2 request", ("model", "inputs", "outputs"), infer),
        CommandSpec("logs", "the last N log lines", ("lines", "level"), logs_cmd),
        CommandSpec("deploy", "start an over-the-air model update (a job)", DEPLOY_ARGS, deploy),
        CommandSpec(
            "rollback", "go back to previous or a version on disk", ROLLBACK_ARGS, rollback
        ),
        CommandSpec("update.status", "the running or last update job", (), update_status),
        CommandSpec("update.cancel", "cancel the update job before its swap", (), update_cancel),
    ]
    return {spec.name: spec for spec in specs}
