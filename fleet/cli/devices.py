"""`edge-fleet devices` and `edge-fleet watch`: one row per device the broker knows.

    edge-fleet devices [--group G] [--sort COL] [--settle S]      a table (or --json rows)
    edge-fleet watch [--group G] [--sort COL] [--for S | --once]  the same, live (rich)

Columns: device, online/offline and since when, agent version, model name and version,
the bundle variant the device chose (`--json` rows add `variant_reason`: why), health, p95 (latest telemetry interval), rate, RSS, hottest temperature, outbox depth,
age of the latest telemetry, current update job and phase. `watch` adds a line for the
newest rollout in the record (waves, outcomes, whether it finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fleet.errors import FleetError
from fleet.ports import DeviceRow

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from fleet.cli.context import Context
    from fleet.ports import Store


def _none_last(value: Any) -> tuple[int, Any]:
    return (1, 0) if value is None else (0, value)


# Sort keys: the column name -> the row's value (None sorts last; numbers high first
# where high is the news: p95, rss, temperature, outbox, age).
SORTS: dict[str, tuple[Callable[[DeviceRow], Any], bool]] = {
    "device": (lambda r: r.device_id, False),
    "state": (lambda r: (r.online is not False, r.online is None, r.device_id), False),
    "agent": (lambda r: r.agent_version or "", False),
    "model": (lambda r: (r.model_name or "", r.model_version or ""), False),
    "variant": (lambda r: r.variant or "", False),
    "health": (lambda r: r.health, False),
    "p95": (lambda r: r.p95_ms, True),
    "rate": (lambda r: r.rate_per_s, True),
    "rss": (lambda r: r.rss_mb, True),
    "temp": (lambda r: r.temperature_c, True),
    "outbox": (lambda r: r.outbox_messages, True),
    "age": (lambda r: r.seen_at, False),  # oldest first: the silent ones
    "phase": (lambda r: (r.phase or "", r.job or ""), False),
}


def register(sub: Any) -> None:
    devices = sub.add_parser("devices", help="list every device seen on the broker")
    _common(devices)
    devices.add_argument(
        "--settle", type=float, default=10.0, metavar="S",
        help="wait at most S seconds for the retained messages (default 10)",
    )  # fmt: skip
    devices.add_argument(
        "--telemetry", type=float, default=0.0, metavar="S",
        help="telemetry is not retained: wait up to S seconds for a report from every "
        "online device (default 0: the table shows what the broker keeps)",
    )  # fmt: skip
    devices.set_defaults(run=run_devices)
    watch = sub.add_parser("watch", help="the devices table, live")
    _common(watch)
    watch.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh every S s")
    watch.add_argument("--for", dest="for_s", type=float, default=None, metavar="S",
                       help="stop after S seconds (default: until Ctrl-C)")  # fmt: skip
    watch.add_argument("--once", action="store_true", help="draw once and exit")
    watch.set_defaults(run=run_watch)


def json_option(parser: argparse.ArgumentParser) -> None:
    """`--json` after the command too (`edge-fleet ping X --json`); SUPPRESS keeps the
    global one when this is not given."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    json_option(parser)
    parser.add_argument("--group", default=None, help="only the members of this group")
    parser.add_argument("--sort", default="device", choices=sorted(SORTS), help="sort key")


def sort_rows(rows: Sequence[DeviceRow], key: str) -> list[DeviceRow]:
    get, descending = SORTS[key]
    if descending:
        present = sorted((r for r in rows if get(r) is not None), key=get, reverse=True)
        return present + sorted((r for r in rows if get(r) is None), key=lambda r: r.device_id)
    return sorted(rows, key=lambda r: _none_last(get(r)))


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceRow))


def row_json(row: DeviceRow, now: float | None = None) -> dict[str, Any]:
    # Field by field: dataclasses.asdict deep-copies every value and took ~1 s of
    # `devices --json` at 10,000 devices; the rows hold only flat values and mappings.
    data = {name: getattr(row, name) for name in _ROW_FIELDS}
    data["groups"] = list(row.groups)
    data["live"], data["shadow"] = dict(row.live), dict(row.shadow)
    now = time.time() if now is None else now
    data["telemetry_age_s"] = None if row.telemetry_ts is None else round(now - row.telemetry_ts, 3)
    return data


# ------------------------------------------------------------------------ formatting


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 100:
        return f"{seconds:.0f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = ("device", "state", "agent", "model", "variant", "health", "p95 ms", "rate/s", "RSS MB",
           "temp °C", "outbox", "telemetry", "update")  # fmt: skip


def row_cells(row: DeviceRow, now: float) -> list[str]:
    if row.online is None:
        state = "?"
    else:
        state = "online" if row.online else "offline"
        if row.since is not None:
            state += f" {ago(now - row.since)}"
    model = "-" if row.model_version is None else f"{row.model_name or '?'} {row.model_version}"
    update = "-" if row.job is None else f"{row.phase or '?'} {row.job[:8]}"
    age = ago(None if row.telemetry_ts is None else now - row.telemetry_ts)
    return [
        row.device_id,
        state,
        row.agent_version or "-",
        model,
        row.variant or "-",
        row.health,
        _num(row.p95_ms, ".2f"),
        _num(row.rate_per_s, ".1f"),
        _num(row.rss_mb, ".0f"),
        _num(row.temperature_c, ".0f"),
        _num(row.outbox_messages, "d"),
        age,
        update,
    ]


_STYLE = {"ready": "green", "overloaded": "yellow", "not_ready": "red", "unknown": "dim"}


def table(rows: Sequence[DeviceRow], title: str | None = None) -> Table:
    from rich.table import Table

    t = Table(title=title, show_edge=False, pad_edge=False, header_style="bold")
    for name in COLUMNS:
        numeric = name.endswith(("ms", "/s", "MB", "°C", "outbox"))
        t.add_column(name, no_wrap=True, justify="right" if numeric else "left")
    now = time.time()
    for row in rows:
        cells = row_cells(row, now)
        style = "red" if row.online is False else None
        cells[5] = f"[{_STYLE.get(row.health, 'dim')}]{cells[5]}[/]"
        t.add_row(*cells, style=style)
    return t


def summary(rows: Sequence[DeviceRow]) -> str:
    online = sum(1 for r in rows if r.online)
    offline = sum(1 for r in rows if r.online is False)
    return f"{len(rows)} devices: {online} online, {offline} offline"


# ------------------------------------------------------------------------ commands


RETAINED_TELEMETRY_WAIT_MAX_DEVICES = 2000


def run_devices(args: argparse.Namespace, ctx: Context) -> int:
    ctx.record_commands = False  # listing sends no command
    view = ctx.view(settle_s=args.settle, follow=False)
    # A small fleet's retained telemetry comes within milliseconds of its state: take
    # it (bounded wait). A large fleet's takes seconds to read and a broker with default
    # queue limits drops part of it, so a one-shot table there lists status and state
    # only, unless --telemetry S asks to wait for the reports.
    if args.telemetry > 0 or len(view) <= RETAINED_TELEMETRY_WAIT_MAX_DEVICES:
        view.follow(min(1.0, args.settle))
    if args.telemetry > 0:
        online = {r.device_id for r in view.rows(args.group) if r.online}
        view.wait(
            lambda v: all((r := v.row(d)) is None or r.telemetry_ts for d in online),
            args.telemetry,
        )
    rows = sort_rows(view.rows(args.group), args.sort)
    if not view.settled:
        ctx.progress(f"edge-fleet: the retained messages did not settle in {args.settle:g} s; "
                     "the list may be incomplete")  # fmt: skip

    def human(console: Console) -> None:
        if not rows:
            where = f" in group {args.group}" if args.group else ""
            console.print(f"no devices seen{where} on {ctx.config.broker.url}")
            return
        console.print(table(rows))
        console.print(summary(rows))

    now = time.time()
    ctx.emit([row_json(r, now) for r in rows], human)
    return 0


def rollout_line(store: Store) -> str | None:
    """The newest rollout in the record, in one line (None when there is none), from
    the rollout's own fold of its records (fleet/rollout/state.py)."""
    from fleet.rollout.state import RolloutState

    ids = store.rollout_ids(limit=1)
    if not ids:
        return None
    state = RolloutState.fold(store.records(rollout_id=ids[0]))
    counts = ", ".join(f"{n} {k}" for k, n in state.counts().items()) or "no devices"
    phase = state.phase
    if state.finished is not None:
        phase = f"finished: {state.finished}"
    if state.reason and state.phase in ("finished", "halting"):
        phase += f" ({state.reason})"
    bundle = f"{state.bundle.get('name', '?')} {state.version}"
    return (f"rollout {state.rollout_id} ({bundle}): wave {state.waves_started}/"
            f"{len(state.waves)}, {counts}; {phase}")  # fmt: skip


def run_watch(args: argparse.Namespace, ctx: Context) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    ctx.record_commands = False
    view = ctx.view(settle_s=10.0)
    store: Store | None
    try:
        store = ctx.store()
    except FleetError as exc:  # no record: the table alone
        ctx.progress(f"edge-fleet: no rollout progress ({exc.message})")
        store = None

    def frame() -> tuple[list[DeviceRow], str | None]:
        rows = sort_rows(view.rows(args.group), args.sort)
        line = None
        if store is not None:
            try:
                line = rollout_line(store)
            except FleetError as exc:
                line = f"record unavailable: {exc.message}"
        return rows, line

    if ctx.json:  # one snapshot per refresh, one JSON document per line
        deadline = None if args.for_s is None else time.monotonic() + args.for_s
        while True:
            rows, line = frame()
            ctx.emit({"ts": time.time(), "rollout": line, "devices": [row_json(r) for r in rows]})
            if args.once or (deadline is not None and time.monotonic() >= deadline):
                return 0
            time.sleep(args.interval)

    def render() -> Group:
        rows, line = frame()
        parts: list[Any] = [table(rows, title=f"{ctx.config.broker.url}  {summary(rows)}")]
        if line:
            parts.append(Text(line, style="bold"))
        parts.append(Text(f"sorted by {args.sort}; Ctrl-C to stop", style="dim"))
        return Group(*parts)

    console = ctx.console()
    if args.once:
        console.print(render())
        return 0
    deadline = None if args.for_s is None else time.monotonic() + args.for_s
    with Live(render(), console=console, refresh_per_second=4, transient=False) as live:
        while deadline is None or time.monotonic() < deadline:
            left = args.interval if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(args.interval, left)))
            live.update(render())
    return 0
