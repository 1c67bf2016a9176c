"""`edge-fleet simulate N`: N light simulated devices against the broker, until SIGINT/SIGTERM.

For trying the console, tests and benchmarks without hardware (fleet/simulate/).
The devices trust `--console-key` (repeatable); without one they accept unsigned
commands, as an agent with `commands.require_signature = false` does.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.protocol.topics import NAME_RE
from agent.signing import KeyFileError, load_public_key
from fleet.errors import FleetCode, FleetError

MAX_DEVICES = 100_000
CONNECT_S = 5.0
SIGNALS = ("p95_factor", "error_rate", "agreement", "nonfinite_rate")


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run N simulated devices until interrupted")
    p.add_argument("n", type=int, help="how many devices")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, ...")
    p.add_argument("--groups", default="", help="a,b: device i joins the (i mod count)-th group")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share whose validation fails")
    p.add_argument("--crash-rate", type=float, default=0.0, help="share that dies mid-update")
    p.add_argument("--hang-rate", type=float, default=0.0, help="share that hangs mid-update")
    p.add_argument("--hang-phase", default="downloading", help="where hanging devices stop")
    p.add_argument(
        "--crash-phase", default=None, help="verifying, validating or trial (default: seeded)"
    )
    p.add_argument("--phase-latency", type=float, default=0.5, help="seconds per update phase")
    p.add_argument("--trial", type=float, default=None, help="trial seconds (default: deploy's)")
    p.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds")
    p.add_argument("--connections", type=int, default=None, help="multiplex on K connections")
    p.add_argument("--protocol", default="5", choices=("5", "3.1.1"))
    p.add_argument("--console-key", type=Path, action="append", default=[], help="trusted PEM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="sim-model:1.0.0", help="NAME:VERSION served at start")
    p.add_argument("--skip-download", action="store_true", help="no real bundle downloads")
    p.add_argument(
        "--live-since-swap",
        action="store_true",
        help="model.live of a new model counts only requests since its swap (as the agent)",
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="VERSION:KEY=V,...",
        help="how a version behaves, e.g. 2.0.0:p95_factor=1.5,error_rate=0.02,agreement=0.9",
    )
    p.add_argument("--tls-ca", type=Path, default=None, help="CA of an mqtts:// broker")
    p.add_argument("--for", dest="duration", type=float, default=None, help="stop after S s")
    p.set_defaults(run=run)


def _bad(message: str) -> FleetError:
    return FleetError(FleetCode.BAD_INPUT, message)


def broker_address(ctx: Any) -> tuple[str, int, bool, str | None]:
    """The console's broker (--broker, else fleet.toml: fleet/config.py): host, port, TLS, CA.
    The simulated devices connect where the console would."""
    config = ctx.config
    broker = config.broker
    return str(broker.host), int(broker.port), bool(broker.tls), config.tls_ca


def parse_profiles(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in items:
        version, sep, rest = item.partition(":")
        if not sep or not version or not rest:
            raise _bad(
                f"--profile {item!r}: want VERSION:KEY=VALUE,... (keys: {', '.join(SIGNALS)})"
            )
        values: dict[str, float] = {}
        for pair in rest.split(","):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or key not in SIGNALS:
                raise _bad(f"--profile {item!r}: {key!r} is not one of {', '.join(SIGNALS)}")
            try:
                number = float(value)
            except ValueError:
                raise _bad(f"--profile {item!r}: {value!r} is not a number") from None
            if not 0 <= number <= 1000:
                raise _bad(f"--profile {item!r}: {key} must be from 0 to 1000")
            values[key] = number
        out[version] = values
    return out


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.n <= MAX_DEVICES:
        raise _bad(f"N must be from 1 to {MAX_DEVICES}, not {args.n}")
    for name in ("fail_rate", "crash_rate", "hang_rate"):
        value = getattr(args, name)
        if not 0 <= value <= 1:
            raise _bad(f"--{name.replace('_', '-')} must be from 0 to 1, not {value}")
    if not 0 <= args.phase_latency <= 3600:
        raise _bad(f"--phase-latency must be from 0 to 3600 s, not {args.phase_latency}")
    if not 0.05 <= args.telemetry_interval <= 86_400:
        raise _bad(
            f"--telemetry-interval must be from 0.05 to 86400 s, not {args.telemetry_interval}"
        )
    if args.trial is not None and not 0 <= args.trial <= 86_400:
        raise _bad(f"--trial must be from 0 to 86400 s, not {args.trial}")
    if args.connections is not None and not 1 <= args.connections <= args.n:
        raise _bad(f"--connections must be from 1 to N ({args.n}), not {args.connections}")
    if not NAME_RE.fullmatch(f"{args.prefix}-{args.n}"):
        raise _bad(f"--prefix {args.prefix!r}: device ids must be 1-64 of A-Za-z0-9._-")


def run(args: argparse.Namespace, ctx: Any) -> int:
    from fleet.simulate import Simulator

    _check(args)
    host, port, tls, ca = broker_address(ctx)
    if args.tls_ca is not None:
        ca = str(args.tls_ca)
    try:
        keys = [load_public_key(p) for p in args.console_key]
    except KeyFileError as exc:
        raise _bad(f"--console-key: {exc}") from None
    name, _, version = args.model.partition(":")
    groups = [g for g in args.groups.split(",") if g] if args.groups else None
    try:
        sim = Simulator(
            host,
            port,
            args.n,
            prefix=args.prefix,
            groups=groups,
            console_keys=keys,
            protocol=args.protocol,
            tls=(ca, None, None) if tls else None,
            connections=args.connections,
            telemetry_interval_s=args.telemetry_interval,
            seed=args.seed,
            fail_rate=args.fail_rate,
            crash_rate=args.crash_rate,
            hang_rate=args.hang_rate,
            hang_phase=args.hang_phase,
            crash_phase=args.crash_phase,
            latency=args.phase_latency,
            trial_s=args.trial,
            skip_download=args.skip_download,
            live_since_swap=args.live_since_swap,
            profile=parse_profiles(args.profile),
            model=(name or "sim-model", version or "1.0.0"),
        )
    except (ValueError, KeyError) as exc:  # a group name or prefix the topics refuse
        raise _bad(f"simulate: {exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    sim.start()
    try:
        # No connection at all after a few seconds: the broker is not there (or refuses
        # these clients); say so now instead of after the whole start-up bound.
        if not sim.wait_online(CONNECT_S) and sim.stats()["connected"] == 0:
            raise FleetError(
                FleetCode.BROKER,
                f"no simulated device could connect to {host}:{port} within {CONNECT_S:g} s "
                "(is the broker running, and does it accept these clients?)",
            )
        if not sim.wait_online(max(30.0, args.n / 100)):
            raise FleetError(
                FleetCode.BROKER,
                f"the simulated devices could not all come online at {host}:{port} "
                "(is the broker running, and does it accept these clients?)",
            )
        if not ctx.json:
            print(
                f"simulating {args.n} devices ({args.prefix}-…) on {host}:{port} over "
                f"{len(sim.conns)} connection(s); Ctrl-C stops",
                file=sys.stderr,
            )
        stop.wait(args.duration)
    finally:
        stats = sim.stats()
        sim.close()
    stats["seconds"] = round(time.monotonic() - started, 1)
    if ctx.json:
        print(json.dumps(stats))
    else:
        sent = ", ".join(f"{k} {v}" for k, v in sorted(stats["sent"].items()))
        print(
            f"{stats['devices']} devices, {stats['seconds']} s, sent: {sent or 'nothing'}; "
            f"loop busy {stats['loop_busy_s']} s"
        )
    return 0
