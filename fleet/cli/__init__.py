"""edge-fleet: the operator console.

Each sub-command lives in its own module under `fleet/cli/` with two functions:

    def register(sub: argparse._SubParsersAction) -> None   # add its parser(s); set
        # `parser.set_defaults(run=<callable(args, ctx) -> int>)`
    ...

`main` parses the global options (`--broker`, `--config`, `--json`, `--db`, `--key`,
`--operator`), builds a `Context` (fleet/cli/context.py) and calls the chosen `run`.
Every FleetError becomes `edge-fleet: [code] message` (or a JSON error with `--json`)
and exit status 2; no traceback reaches the operator.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from fleet.errors import FleetCode, FleetError

log = logging.getLogger(__name__)

# One line per command module; each registers its own parsers.
COMMAND_MODULES = [
    "fleet.cli.index",
    "fleet.cli.records",
    "fleet.cli.devices",
    "fleet.cli.device",
    "fleet.cli.simulate",
    "fleet.cli.rollout",
    "fleet.cli.serve",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description="edgerun fleet console")
    parser.add_argument(
        "--config", default=None, help="fleet.toml (default: ./fleet.toml if present)"
    )
    parser.add_argument("--broker", default=None, help="mqtt://host:port or mqtts://host:port")
    parser.add_argument("--db", default=None, help="record: a SQLite path or postgresql://… URL")
    parser.add_argument("--key", default=None, help="the console's ed25519 signing key (PEM)")
    parser.add_argument("--operator", default=None, help="who is recorded (default: $USER)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run: Callable[[argparse.Namespace, Any], int] = args.run
    from fleet.cli.context import Context

    ctx = Context(args)
    try:
        return run(args, ctx)
    except FleetError as exc:
        if args.json:
            print(json.dumps({"error": exc.to_json()}), file=sys.stdout)
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
        log.debug("edge-fleet %s failed", args.command, exc_info=True)
        error = FleetError(
            FleetCode.INTERNAL,
            f"{args.command} failed unexpectedly ({type(exc).__name__}: {exc}); "
            "this is a bug in edge-fleet: run with EDGE_FLEET_DEBUG=1 for the traceback "
            "and report it",
        )
        if os.environ.get("EDGE_FLEET_DEBUG"):
            traceback.print_exc()
        if args.json:
            print(json.dumps({"error": error.to_json()}), file=sys.stdout)
        print(f"edge-fleet: {error}", file=sys.stderr)
        return 2
    finally:
        ctx.close()


if __name__ == "__main__":
    raise SystemExit(main())
