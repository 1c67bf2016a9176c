"""edge-agent: run the device agent, check its config, verify bundles, query it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__

if TYPE_CHECKING:
    import numpy as np

DEFAULT_CONFIG = Path("/etc/edgerun/agent.toml")
DEFAULT_SOCKET = "/run/edgerun/api.sock"


def _config_path(value: str | None) -> Path | None:
    if value:
        return Path(value)
    env = os.environ.get("EDGERUN_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _setup_logging(level: str) -> None:
    # Under systemd the journal adds timestamps; elsewhere we do.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


class _CannotStart(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _printable(text: str) -> str:
    """`text` with control characters (a hostile value's ANSI escapes, CRs) escaped."""
    return "".join(
        ch if ch.isprintable() or ch == "\n" else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def _say_cannot_start(code: str, message: str) -> None:
    # One line per start-up failure, in the same form wherever it comes from, so a
    # person (and a script grepping the journal) can tell why and what to fix.
    print(f"cannot start [{code}]: {_printable(message)}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config.loader import ConfigError, load_config
    from agent.preflight import START_INTERNAL

    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        _say_cannot_start(exc.code, str(exc))
        return 1
    _setup_logging(args.log_level or config.log_level)
    log = logging.getLogger("edge-agent")
    try:
        return _run(config)
    except _CannotStart as exc:
        _say_cannot_start(exc.code, str(exc))
        return 1
    except Exception as exc:
        # A bug, not a bad input: one line for the user, the traceback for developers
        # (at debug level, which is also what goes to the journal when asked for).
        log.debug("internal error during start-up", exc_info=True)
        _say_cannot_start(
            START_INTERNAL,
            f"internal error: {type(exc).__name__}: {exc} "
            "(run with --log-level debug for the traceback)",
        )
        return 1


def _run(config: Any) -> int:
    from agent.config.typed import ConfigError
    from agent.preflight import START_FAILED, START_LOCKED, check_link_files, check_state_dir
    from agent.service import Agent, StartupError
    from agent.statelock import StateDirLockedError, StateLock

    problems = check_state_dir(config.state_dir) + check_link_files(config)
    if problems:
        raise _CannotStart(problems[0].code, "; ".join(str(p) for p in problems))
    # The lock comes before anything touches the state dir or the API socket: a second
    # agent must not clean the first one's unpacks or unlink its socket.
    try:
        lock = StateLock.acquire(config.state_dir)
    except StateDirLockedError as exc:
        raise _CannotStart(START_LOCKED, str(exc)) from exc
    except OSError as exc:
        raise _CannotStart(
            START_FAILED, f"state_dir {config.state_dir}: {exc.strerror or exc}"
        ) from exc
    try:
        agent = Agent(config)
        for component in _extra_components(agent):
            agent.add_component(component)
        code = asyncio.run(agent.run())
    except StartupError as exc:
        # Raised over a ConfigError (the link's settings), it is a config problem.
        cause = exc.__cause__
        raise _CannotStart(
            cause.code if isinstance(cause, ConfigError) else exc.code, str(exc)
        ) from exc
    if agent.workers_running:
        # An install abandoned at SIGTERM may sit in a runtime's C code; interpreter
        # teardown under it is not safe, and nothing of it needs finishing (the store
        # only ever renames complete results into place).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    lock.release()
    return code


def _extra_components(agent: Any) -> list[Any]:
    """Optional parts that attach to the agent when configured (the MQTT link)."""
    try:
        from agent.link import components_for
    except ImportError:
        return []
    result: list[Any] = components_for(agent)
    # Pull updates through the signed release index (update.repository); the twin's
    # desired versions go to them too.
    from agent.config.typed import ConfigError
    from agent.service import StartupError
    from agent.update.poll import PullComponent, pull_for

    def served() -> tuple[str, str] | None:
        model = agent.host.model
        return None if model is None else (model.manifest.name, model.manifest.version)

    try:
        pull = pull_for(agent.config, agent.updates, served, agent.events.emit)
    except ConfigError as exc:
        raise StartupError(str(exc)) from exc
    if pull is not None:
        for component in result:
            if hasattr(component, "attach_pull"):
                component.attach_pull(pull)
        result.append(PullComponent(pull))
    return result


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent import preflight
    from agent.config.loader import ConfigError, env_overrides, load_config
    from agent.statelock import holder

    path = Path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.issues)} problem(s)")
        for issue in exc.issues:
            line = f"{issue.path or '<file>'}: {issue.message}"
            print(f"  [{exc.code}] {_printable(line).replace(chr(10), ' ')}")
        return 1
    for issue in env_overrides(os.environ)[1]:
        print(f"warning: {_printable(issue.message)} (ignored)")
    # The same checks start-up makes, plus the ones start-up tolerates (a missing
    # model.bundle while `current` serves, no trusted key) but a device should not have.
    problems = preflight.check_keys(config) + preflight.check_bundle(config)
    problems += preflight.check_state_dir(config.state_dir)
    note = ""
    try:
        pid = holder(config.state_dir)
    except OSError as exc:
        pid = None
        problems.append(
            preflight.Problem(
                "state_dir",
                f"{config.state_dir}: lock file: {exc.strerror or exc}",
                preflight.START_FAILED,
            )
        )
    if pid is not None:
        who = f"pid {pid}" if pid else "pid unknown"
        problems.append(
            preflight.Problem(
                "state_dir",
                f"an agent ({who}) is running on {config.state_dir}; `run` is refused "
                "until it stops",
                preflight.START_LOCKED,
                warning=True,
            )
        )
        note = f"(probably by the agent running on this state_dir, {who}; it frees it on stop)"
    problems += preflight.check_api(config, note) + preflight.check_link(config)
    problems += preflight.check_pull(config) + preflight.check_jetson(config)
    for p in problems:
        if p.warning:
            print(f"warning [{p.code}] {_printable(str(p))}")
    errors = [p for p in problems if not p.warning]
    if errors:
        print(f"{path}: {len(errors)} problem(s)")
        for p in errors:
            print(f"  [{p.code}] {_printable(str(p)).replace(chr(10), ' ')}")
        return 1
    keys = len(config.trust.public_keys)
    print(f"{path}: OK (device {config.device_id}, {keys} trusted key(s))")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.admission import limits_from
    from agent.bundle import BundleError, verify_bundle
    from agent.config.loader import ConfigError, load_config, read_public_keys
    from agent.config.model import AgentConfig
    from agent.regular_files import check_regular
    from agent.service import StartupError, UnreadableBundleError, load_trusted_keys
    from agent.signing import KeyFileError

    try:
        config = load_config(Path(args.config)) if args.config else AgentConfig()
        keys = (
            # Read like the config's keys: never blocking on a FIFO, never unbounded.
            read_public_keys(list(args.key), "--key") if args.key else load_trusted_keys(config)
        )
    except (ConfigError, StartupError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not keys:
        print(
            "error: no public key: pass --key KEY.pub or --config with trust.public_keys",
            file=sys.stderr,
        )
        return 2
    try:
        check_regular(Path(args.bundle))
    except OSError as exc:
        # A FIFO or a device would block the reader, or never end.
        print(f"REFUSED [{UnreadableBundleError.code}] {args.bundle}: {exc.strerror or exc}")
        return 1
    try:
        bundle = verify_bundle(Path(args.bundle), keys, limits_from(config))
    except BundleError as exc:
        print(f"REFUSED [{exc.code}] {args.bundle}: {exc}")
        return 1
    m = bundle.manifest
    print(f"OK {args.bundle}")
    print(f"  name {m.name}  version {m.version}  signed by {bundle.signer}")
    print(f"  sha256 {bundle.sha256}")
    print(f"  formats {', '.join(f'{k}={v}' for k, v in m.formats.items())}")
    for spec in m.inputs:
        print(f"  input  {spec.name} {spec.dtype} {list(spec.shape)}")
    for spec in m.outputs:
        print(f"  output {spec.name} {spec.dtype} {list(spec.shape)}")
    if m.peak_memory_mb:
        print("  peak memory " + ", ".join(f"{k} {v} MB" for k, v in m.peak_memory_mb.items()))
    return 0


def _load_input(path: Path, name: str | None) -> dict[str, np.ndarray]:
    import numpy as np

    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return {name or "input": array}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    payload = json.loads(path.read_text())
    if isinstance(payload, list):
        return {name or "input": np.asarray(payload, dtype=np.float32)}
    return {k: np.asarray(v, dtype=np.float32) for k, v in payload.items()}


def _token(args: argparse.Namespace) -> str | None:
    if not args.token_file:
        return None
    return Path(args.token_file).read_text().strip()


def _print_quietly(text: str) -> None:
    """Print to stdout; a reader that went away (`| head`) ends us quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _api_error_hint(exc: Exception, binary: bool) -> str:
    from agent.api.client import ApiError

    if isinstance(exc, ApiError):
        hint = ""
        message = str(exc.body.get("error", ""))
        if "api.max_request_mb" in message and not binary:
            hint = "; try --binary (binary tensors are about 4x smaller than JSON)"
        elif exc.status == 401:
            hint = "; pass --token-file with the token of api.token"
        elif exc.code == "overloaded":
            hint = "; the agent is shedding load, retry in a moment"
        return f"error: {exc.body.get('error', exc)} [{exc.code}]{hint}"
    return f"error: {exc}"


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from agent.api.client import ApiClient, ApiError

    try:
        with ApiClient(args.socket, token=_token(args)) as client:
            meta = client.get_json("/v2/edgerun/status")
            model = args.model or (meta.get("model") or {}).get("name")
            if not model:
                print("error: the agent serves no model yet", file=sys.stderr)
                return 1
            desc = client.get_json(f"/v2/models/{model}")
            default_name = desc["inputs"][0]["name"] if len(desc["inputs"]) == 1 else None
            inputs = _load_input(Path(args.input), args.input_name or default_name)
            for spec in desc["inputs"]:
                if spec["name"] in inputs and spec["datatype"] == "FP32":
                    inputs[spec["name"]] = inputs[spec["name"]].astype(np.float32)
            outputs = client.infer(model, inputs, binary=args.binary)
    except (OSError, ApiError, ValueError, KeyError) as exc:
        print(_api_error_hint(exc, args.binary), file=sys.stderr)
        return 1
    labels = desc.get("parameters", {}).get("labels") or []
    result: dict[str, Any] = {k: v.tolist() for k, v in outputs.items()}
    if labels and len(outputs) == 1:
        scores = next(iter(outputs.values()))
        if scores.ndim == 2 and scores.shape[1] == len(labels):
            result["top1"] = [labels[i] for i in scores.argmax(axis=1)]
    _print_quietly(json.dumps(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.api.client import ApiClient, ApiError

    try:
        with ApiClient(args.socket, token=_token(args)) as client:
            status = client.get_json("/v2/edgerun/status")
    except ApiError as exc:
        print(_api_error_hint(exc, False), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: cannot reach the agent at {args.socket}: {exc}", file=sys.stderr)
        return 1
    _print_quietly(json.dumps(status, indent=2))
    return 0 if status.get("ready") else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent (systemd runs this)")
    run.add_argument("--config", help=f"agent.toml (default $EDGERUN_CONFIG or {DEFAULT_CONFIG})")
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides log_level; debug also logs the traceback of an internal error",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate agent.toml; exit 1 on problems")
    check.add_argument("config")
    check.set_defaults(func=cmd_check_config)

    verify = sub.add_parser("verify", help="check a bundle's signature and contents")
    verify.add_argument("bundle")
    verify.add_argument("--key", action="append", help="trusted public key (repeatable)")
    verify.add_argument("--config", help="take trusted keys and limits from agent.toml")
    verify.set_defaults(func=cmd_verify)

    infer = sub.add_parser("infer", help="send one request to the local API")
    infer.add_argument("--input", required=True, help="FILE.npy, .npz or .json")
    infer.add_argument("--input-name", help="input name for a .npy/.json list")
    infer.add_argument("--model", help="model name (default: the one served)")
    infer.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket path or host:port")
    infer.add_argument("--binary", action="store_true", help="use the binary tensor extension")
    infer.add_argument("--token-file", help="file holding the API token (api.token), for TCP")
    infer.set_defaults(func=cmd_infer)

    status = sub.add_parser("status", help="print the agent's status")
    status.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket path or host:port")
    status.add_argument("--token-file", help="file holding the API token (api.token), for TCP")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Paths and values from the environment may hold undecodable bytes; printing them
    # must escape, not raise.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Outside `run` (which says `cannot start`), still one line and no traceback.
        logging.getLogger("edge-agent").debug("internal error", exc_info=True)
        print(f"error: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
