"""`deploy`, `rollout list|show|pause|resume|abort|rollback|drive`, `rollback --to`.

    edge-fleet deploy digits-2.0.0.edgebundle --to group:line-1 --canary 2 --wave 25% \\
        --soak 300 --gate "p95_ms<=1.2x,error_rate<=0.01" --via http

`deploy` records the rollout and drives it here, printing each wave, device outcome,
gate and decision as it happens; exit 0 only when the rollout succeeded (1 when it
halted, was aborted or rolled back). Any console sharing the record can `rollout
pause|resume|abort|rollback ID`; `resume`/`rollback`/`drive` take over the driving when
no live console holds the rollout's lease (one killed mid-rollout lets it lapse).

The `[rollout]` table of fleet.toml gives defaults: soak_s, device_timeout_s, via,
lease_ttl_s, http_host, trust (a list of release public keys).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from agent.protocol.topics import TopicError, device_id, group_name
from fleet.errors import FleetCode, FleetError
from fleet.ports import Commander, Store, View
from fleet.rollout.bundle import BundleInfo, inspect_bundle, trust_keys
from fleet.rollout.control import load, request, rollback_devices, rollout_rows
from fleet.rollout.engine import (
    RolloutEngine,
    driven_elsewhere,
    lease_is_live,
    lease_name,
    resolve_targets,
)
from fleet.rollout.plan import RolloutPlan
from fleet.rollout.progress import Printer
from fleet.rollout.sources import DeploySource, console_sources, reachable_host
from fleet.rollout.state import FINAL_SUCCEEDED, RolloutState

ROLLOUT_KEYS = {"soak_s", "device_timeout_s", "via", "lease_ttl_s", "http_host", "trust"}


# ------------------------------------------------------------------------ parsers


def register(sub: Any) -> None:
    p = sub.add_parser("deploy", help="roll a bundle out in gated waves")
    p.add_argument("bundle", help="the .edgebundle to deploy")
    p.add_argument(
        "--to",
        action="append",
        required=True,
        help="DEVICE, group:NAME or all (repeat or comma-separate for several)",
    )
    p.add_argument("--canary", default="1", help="first wave: N devices or N%% (default 1)")
    waves = p.add_mutually_exclusive_group()
    waves.add_argument("--wave", default=None, help="fixed waves: N or N%% (default 25%%)")
    waves.add_argument("--rate", type=int, default=None, help="exponential: first wave size")
    p.add_argument("--factor", type=float, default=None, help="growth per wave with --rate (2)")
    p.add_argument("--success", default="100%", help="per-wave success threshold (default 100%%)")
    p.add_argument("--abort", default=None, help="abort threshold: failed %% of finished")
    p.add_argument("--abort-min", type=int, default=None, help="finished devices before --abort")
    p.add_argument("--soak", type=float, default=None, help="seconds after a wave (default 60)")
    p.add_argument("--device-timeout", type=float, default=None, help="seconds (default 600)")
    p.add_argument(
        "--gate", action="append", default=[], help='e.g. "p95_ms<=1.2x,error_rate<=0.01"'
    )
    p.add_argument("--allow-no-data", action="store_true", help="a gate without figures passes")
    p.add_argument("--gate-min-requests", type=int, default=10, help="live requests a gate needs")
    p.add_argument("--via", choices=("http", "mqtt"), default=None, help="bundle transport")
    p.add_argument("--window", action="append", default=[], help="GROUP=HH:MM-HH:MM (UTC)")
    p.add_argument("--trial-window", type=float, default=None, help="device trial seconds")
    p.add_argument("--shadow", action="store_true", help="devices shadow-evaluate first")
    _driving(p)
    p.set_defaults(run=run_deploy)

    r = sub.add_parser("rollout", help="list, show and control rollouts")
    rs = r.add_subparsers(dest="rollout_command", required=True)
    ls = rs.add_parser("list", help="rollouts in the record, newest first")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(run=run_list)
    show = rs.add_parser("show", help="one rollout: plan, waves, devices, gates")
    show.add_argument("rollout_id")
    show.set_defaults(run=run_show)
    for what, text in (
        ("pause", "finish the devices mid-update, start no new ones"),
        ("resume", "go on after a pause, or drive a rollout whose console died"),
        ("abort", "stop: start no new devices, roll nothing back"),
        ("rollback", "roll back every device the rollout updated"),
    ):
        c = rs.add_parser(what, help=text)
        c.add_argument("rollout_id")
        c.add_argument("--reason", default="")
        if what in ("resume", "rollback"):
            c.add_argument("--no-drive", action="store_true", help="only record the request")
            c.add_argument(
                "--wait",
                type=float,
                default=0.0,
                help="seconds to wait for a dead console's lease to lapse, then drive",
            )
            _driving(c)
        c.set_defaults(run=run_request, what=what)
    d = rs.add_parser("drive", help="take over driving a rollout (its lease must be free)")
    d.add_argument("rollout_id")
    _driving(d)
    d.set_defaults(run=run_drive)

    b = sub.add_parser("rollback", help="roll devices back directly (recorded)")
    b.add_argument("--to", action="append", required=True, help="DEVICE or group:NAME")
    b.add_argument("--version", default=None, help="version on the device (default: previous)")
    b.add_argument("--wait", type=float, default=600.0, help="seconds to wait for each job")
    b.set_defaults(run=run_rollback)


def _driving(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-ttl", type=float, default=None, help="driver lease seconds (15)")
    p.add_argument("--tick", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument("--bundle-path", default=None, help="the bundle file on this console")
    p.add_argument("--http-host", default=None, help="address devices fetch the bundle from")
    p.add_argument("--trust", action="append", default=None, help="release public key (PEM)")


# ------------------------------------------------------------------------ the parts


class Parts:
    """What the commands need, from the Context (fleet/cli/context.py builds each part
    on first use: commands that need no broker never connect to one)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    @property
    def config(self) -> Any:
        return self.ctx.config

    @property
    def store(self) -> Store:
        store: Store = self.ctx.store()
        return store

    @property
    def client(self) -> Any:
        return self.ctx.client()

    @property
    def view(self) -> View:
        view: View = self.ctx.view()
        return view

    @property
    def who(self) -> tuple[str, str]:
        return (_key_id(self.config), self.config.operator)

    def rollout_defaults(self) -> dict[str, Any]:
        sections = getattr(self.config, "sections", {}) or {}
        table = dict(sections.get("rollout", {}))
        unknown = sorted(set(table) - ROLLOUT_KEYS)
        if unknown:
            raise FleetError(
                FleetCode.CONFIG,
                f"[rollout] in {self.config.source}: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(ROLLOUT_KEYS))}",
            )
        return table

    def trust(self, args: argparse.Namespace) -> list[Any]:
        paths = args.trust if args.trust is not None else self.rollout_defaults().get("trust", [])
        if isinstance(paths, str):
            paths = [paths]
        return trust_keys(paths)

    def engine(self, args: argparse.Namespace, printer: Printer) -> RolloutEngine:
        defaults = self.rollout_defaults()
        client = self.client
        commander: Commander = client
        http_host = args.http_host or defaults.get("http_host")
        if not http_host:
            broker = self.config.broker
            http_host = reachable_host(broker.host, broker.port)
        lease_ttl = args.lease_ttl or defaults.get("lease_ttl_s") or 15.0

        def sources(via: str, bundle: BundleInfo) -> DeploySource:
            # Keys are read when a bundle is served: a rollback needs none.
            return console_sources(client, str(http_host), self.trust(args))(via, bundle)

        return RolloutEngine(
            self.store,
            self.view,
            commander,
            operator=self.config.operator,
            sources=sources,
            tick_s=args.tick,
            lease_ttl_s=float(lease_ttl),
            command_timeout_s=float(getattr(self.config, "timeout_s", 10.0)),
            on_record=printer.record,
            on_note=printer.note,
        )


def _key_id(config: Any) -> str:
    from agent.signing import key_id

    try:
        return str(key_id(config.signing_key().public_key()))
    except FleetError:
        return ""


def _print(ctx: Any, doc: Any, text: str) -> None:
    if ctx.json:
        print(json.dumps(doc, sort_keys=True, default=str))
    else:
        print(text)


def _targets(values: list[str]) -> tuple[str, ...]:
    return tuple(t.strip() for v in values for t in v.split(",") if t.strip())


def _percent(text: str | None, what: str) -> float | None:
    if text is None:
        return None
    raw = text.strip().rstrip("%")
    try:
        return float(raw)
    except ValueError:
        raise FleetError(
            FleetCode.BAD_INPUT, f"{what} must be a share like 95% or 95, got {text!r}"
        ) from None


# ----------------------------------------------------------------------- commands


def plan_from_args(args: argparse.Namespace, defaults: dict[str, Any]) -> RolloutPlan:
    kw: dict[str, Any] = {
        "targets": _targets(args.to),
        "canary": args.canary,
        "wave": args.wave,
        "rate": args.rate,
        "success_threshold": _percent(args.success, "--success"),
        "abort_threshold": _percent(args.abort, "--abort"),
        "gates": ",".join(args.gate),
        "allow_no_data": args.allow_no_data,
        "gate_min_requests": args.gate_min_requests,
        "via": args.via or defaults.get("via", "http"),
        "windows": tuple(args.window),
        "trial_window_s": args.trial_window,
        "shadow": args.shadow,
        "soak_s": args.soak if args.soak is not None else defaults.get("soak_s", 60.0),
        "device_timeout_s": (
            args.device_timeout
            if args.device_timeout is not None
            else defaults.get("device_timeout_s", 600.0)
        ),
    }
    if args.factor is not None:
        kw["factor"] = args.factor
    if args.abort_min is not None:
        kw["abort_min_finished"] = args.abort_min
    return RolloutPlan(**kw)


def _exit(state: RolloutState) -> int:
    return 0 if state.finished == FINAL_SUCCEEDED else 1


def _final(ctx: Any, state: RolloutState) -> None:
    summary = state.summary()
    if ctx.json:
        print(json.dumps({"summary": summary}, sort_keys=True, default=str), flush=True)
        return
    counts = ", ".join(f"{n} {k}" for k, n in summary["devices"].items())
    print(f"summary: {state.rollout_id} {state.finished or state.phase}: {counts}", flush=True)
    for gate in state.failed_gates():
        print(f"  failed gate: {gate.describe()}", flush=True)


def run_deploy(args: argparse.Namespace, ctx: Any) -> int:
    parts = Parts(ctx)
    defaults = parts.rollout_defaults()
    plan = plan_from_args(args, defaults)  # refused before anything connects
    bundle = inspect_bundle(args.bundle, parts.trust(args))
    parts.config.signing_key()  # no key: refused here, not as a failure of every device
    printer = Printer(ctx.json)
    engine = parts.engine(args, printer)
    state = engine.create(plan, bundle)
    final = engine.drive(state.rollout_id, bundle_path=args.bundle_path)
    _final(ctx, final)
    return _exit(final)


def run_drive(args: argparse.Namespace, ctx: Any) -> int:
    parts = Parts(ctx)
    load(parts.store, args.rollout_id)  # exists
    if lease_is_live(parts.store, args.rollout_id):  # before connecting to anything
        raise driven_elsewhere(parts.store, args.rollout_id)
    parts.config.signing_key()
    printer = Printer(ctx.json)
    final = parts.engine(args, printer).drive(args.rollout_id, bundle_path=args.bundle_path)
    _final(ctx, final)
    return _exit(final)


def run_request(args: argparse.Namespace, ctx: Any) -> int:
    parts = Parts(ctx)
    state = request(parts.store, args.rollout_id, args.what, parts.who, args.reason)
    what = args.what
    held = parts.store.lease(lease_name(args.rollout_id))
    drives = what in ("resume", "rollback") and not args.no_drive
    if drives and held is not None and args.wait > 0:
        # A console that died holds it until it lapses (a live one renews it: then the
        # request alone does the job once the wait is over).
        deadline = time.monotonic() + args.wait
        while held is not None and time.monotonic() < deadline:
            time.sleep(0.2)
            held = parts.store.lease(lease_name(args.rollout_id))
    live = held is not None and held.expires_at > time.time()
    if drives and not live:
        parts.config.signing_key()
        if not ctx.json:
            print(f"{what} recorded; no console drives {args.rollout_id}: driving it here")
        printer = Printer(ctx.json)
        final = parts.engine(args, printer).drive(args.rollout_id, bundle_path=args.bundle_path)
        _final(ctx, final)
        return 0 if final.finished in (FINAL_SUCCEEDED, "rolled_back") else 1
    if live and held is not None:
        driver = (
            f"{held.holder} (lease for {held.expires_at - time.time():.0f} s more; if that "
            "console died, run this again once it lapses)"
        )
    else:
        driver = f"no console (drive it with `edge-fleet rollout drive {args.rollout_id}`)"
    _print(
        ctx,
        {"rollout_id": args.rollout_id, "requested": what, "driver": driver, **state.summary()},
        f"{what} requested for {args.rollout_id}; driven by {driver}",
    )
    return 0


def run_list(args: argparse.Namespace, ctx: Any) -> int:
    rows = rollout_rows(Parts(ctx).store, args.limit)
    if ctx.json:
        print(json.dumps({"rollouts": rows}, sort_keys=True, default=str))
        return 0
    if not rows:
        print("no rollouts in the record")
        return 0
    for row in rows:
        bundle = row.get("bundle", {})
        counts = ", ".join(f"{n} {k}" for k, n in row.get("devices", {}).items())
        state = row.get("outcome") or row.get("phase")
        print(
            f"{row['rollout_id']}  {state:<11} {bundle.get('name')} {bundle.get('version')}  "
            f"{row.get('targets', 0)} device(s): {counts}"
        )
    return 0


def run_show(args: argparse.Namespace, ctx: Any) -> int:
    state = load(Parts(ctx).store, args.rollout_id)
    if ctx.json:
        print(json.dumps(state.to_json(), sort_keys=True, default=str))
        return 0
    s = state.summary()
    b = s["bundle"]
    out = sys.stdout
    print(f"rollout {state.rollout_id}: {state.finished or state.phase}", file=out)
    print(f"  bundle   {b['name']} {b['version']} sha256 {b['sha256'][:16]}… {b['size']} B")
    print(f"  by       {state.created_by[1]} (key {state.created_by[0]}); driver {state.driver}")
    print(f"  plan     {json.dumps(state.plan.to_json(), sort_keys=True)}")
    if state.reason:
        print(f"  reason   {state.reason}")
    for i, wave in enumerate(state.waves):
        done = state.waves_finished.get(i)
        if i >= state.waves_started:
            mark = "not started"
        elif done is not None:
            mark = "passed" if done.get("passed") else "failed"
        else:
            mark = "stopped" if state.finished else "running"
        print(f"  wave {i}: {len(wave)} device(s), {mark}")
        for dev in state.wave_devices(i):
            code = f" [{dev.code}]" if dev.code else ""
            print(f"    {dev.device_id:<24} {dev.status}{code} {dev.message}".rstrip())
    for wave_no, gate in state.gate_results:
        if not gate.passed or gate.inconclusive:
            print(f"  gate (wave {wave_no}) {gate.describe()}")
    return 0


def _rollback_targets(view: View, values: list[str]) -> list[str]:
    targets = _targets(values)
    for t in targets:
        try:
            if t.startswith("group:"):
                group_name(t[len("group:") :])
            elif t == "all":
                raise FleetError(
                    FleetCode.BAD_INPUT, "rollback --to all is refused: name devices or a group"
                )
            else:
                device_id(t)
        except TopicError as exc:
            raise FleetError(FleetCode.BAD_INPUT, f"--to {t}: {exc}") from None
    return resolve_targets(view, targets)


def run_rollback(args: argparse.Namespace, ctx: Any) -> int:
    parts = Parts(ctx)
    if args.version is not None:
        from agent.version import VersionFormatError, parse_version

        try:
            parse_version(args.version)
        except VersionFormatError as exc:
            raise FleetError(FleetCode.BAD_INPUT, f"--version: {exc}") from None
    parts.config.signing_key()
    devices = _rollback_targets(parts.view, args.to)

    def show(r: Any) -> None:
        if ctx.json:
            print(json.dumps(r.to_json(), sort_keys=True), flush=True)
        elif r.ok:
            print(f"  {r.device_id}: rolled back to {r.to_version}", flush=True)
        else:
            print(f"  {r.device_id}: ROLLBACK FAILED [{r.code}] {r.message}", flush=True)

    results = rollback_devices(
        parts.client,
        parts.view,
        parts.store,
        devices,
        version=args.version,
        who=parts.who,
        timeout_s=args.wait,
        command_timeout_s=float(getattr(parts.config, "timeout_s", 10.0)),
        on_result=show,
    )
    failed = [r for r in results if not r.ok]
    if not ctx.json:
        print(f"rollback: {len(results) - len(failed)} of {len(results)} device(s) rolled back")
    return 1 if failed else 0
