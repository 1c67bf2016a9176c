"""Commands to devices: `ping`, `status`, `config set|get`, `infer`, `logs`.

    edge-fleet ping DEVICE|group:G|all [--wait] [--timeout S]
    edge-fleet status DEVICE
    edge-fleet config set DEVICE key=value...     (values are JSON scalars: 5, true, "x")
    edge-fleet config get DEVICE [key...]
    edge-fleet infer DEVICE --input FILE          (.npy, or KServe v2 JSON)
    edge-fleet logs DEVICE [--lines N] [--level L]

Each command is signed, bound to its device and expires (fleet/mqtt.py). A device that
the retained status says is offline is not sent to (console.device_offline) unless
`--wait`; one that never answers fails with console.timeout; a device's refusal prints
its code and message (console.refused, exit 2). Group pings go to each member the view
knows, with progress on stderr; the exit status is 1 when any member failed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.protocol.messages import Reply
from agent.protocol.topics import GROUP_PREFIX, TopicError, device_id, group_name
from fleet.cli.variant_table import print_selection
from fleet.errors import FleetCode, FleetError

if TYPE_CHECKING:
    from rich.console import Console

    from fleet.cli.context import Context

MAX_INPUT_BYTES = 16 * 1024 * 1024  # the largest commands.max_payload_kb a device allows
LEVELS = ("debug", "info", "warning", "error")
# numpy dtype -> KServe v2 datatype
DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "uint64": "UINT64", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}  # fmt: skip


def register(sub: Any) -> None:
    ping = sub.add_parser("ping", help="ping a device, a group (group:G) or all devices")
    ping.add_argument("target", help="DEVICE, group:NAME or all")
    _send_options(ping)
    ping.set_defaults(run=run_ping)

    status = sub.add_parser("status", help="a device's own status (its local API + link)")
    status.add_argument("device")
    _send_options(status)
    status.set_defaults(run=run_status)

    config = sub.add_parser("config", help="read or change a device's run-time settings")
    csub = config.add_subparsers(dest="config_command", required=True)
    cset = csub.add_parser("set", help="change tunables: key=value ... (JSON scalars)")
    cset.add_argument("device")
    cset.add_argument("values", nargs="+", metavar="key=value")
    _send_options(cset)
    cset.set_defaults(run=run_config_set)
    cget = csub.add_parser("get", help="read settings (all readable ones, or the keys given)")
    cget.add_argument("device")
    cget.add_argument("keys", nargs="*", metavar="key")
    _send_options(cget)
    cget.set_defaults(run=run_config_get)

    infer = sub.add_parser("infer", help="run one inference on a device")
    infer.add_argument("device")
    infer.add_argument("--input", required=True, type=Path, help=".npy or KServe v2 JSON")
    infer.add_argument("--name", default="input", help="the input tensor's name (.npy)")
    infer.add_argument("--model", default=None, help="model name (default: the served one)")
    _send_options(infer)
    infer.set_defaults(run=run_infer)

    logs = sub.add_parser("logs", help="a device's recent log lines")
    logs.add_argument("device")
    logs.add_argument("--lines", type=int, default=100, help="how many (default 100)")
    logs.add_argument("--level", default=None, choices=LEVELS, help="this level and above")
    _send_options(logs)
    logs.set_defaults(run=run_logs)


def _send_options(parser: argparse.ArgumentParser) -> None:
    from fleet.cli.devices import json_option

    json_option(parser)
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="wait S seconds for the reply (default: timeout_s, 10)")  # fmt: skip
    parser.add_argument("--wait", action="store_true",
                        help="send even when the device is offline and wait for it")  # fmt: skip


def _device(value: str) -> str:
    try:
        return device_id(value)
    except TopicError as exc:
        raise FleetError(FleetCode.BAD_INPUT, str(exc)) from None


def _timeout(args: argparse.Namespace, ctx: Context) -> float:
    value = args.timeout
    if value is None:
        return ctx.config.timeout_s
    if not 0.05 <= value <= 3600:
        raise FleetError(FleetCode.BAD_INPUT, f"--timeout {value:g} must be 0.05-3600 seconds")
    return float(value)


def request(
    ctx: Context, args: argparse.Namespace, device: str, name: str, cmd_args: dict[str, Any]
) -> Reply:
    """Send one command to one device and return its successful Reply; a refusal is
    FleetError(console.refused) carrying the device's code."""
    device = _device(device)
    timeout = _timeout(args, ctx)
    view = ctx.view(settle_s=min(timeout, 5.0), device=device)
    if view.row(device) is None and view.settled and not args.wait:
        raise FleetError(
            FleetCode.UNKNOWN_DEVICE,
            f"{device} has never been seen on {ctx.config.broker.url} (no retained status or "
            "state): check the id (`edge-fleet devices` lists them), or --wait for it",
            device=device,
        )
    reply = ctx.client().request(device, name, cmd_args, timeout_s=timeout, wait_offline=args.wait)
    return ensure_ok(reply, device, name)


def ensure_ok(reply: Reply, device: str, name: str) -> Reply:
    if reply.ok:
        return reply
    code = reply.error.code if reply.error else "?"
    message = reply.error.message if reply.error else ""
    raise FleetError(
        FleetCode.REFUSED, f"{device} refused {name}: [{code}] {message}",
        device=device, device_code=code,
    )  # fmt: skip


def _pretty(console: Console, data: Any) -> None:
    from rich.pretty import Pretty

    console.print(Pretty(data, expand_all=True))


# ------------------------------------------------------------------------ ping


def run_ping(args: argparse.Namespace, ctx: Context) -> int:
    target: str = args.target
    if target != "all" and not target.startswith(GROUP_PREFIX):
        t0 = time.perf_counter()
        reply = request(ctx, args, target, "ping", {})
        ms = (time.perf_counter() - t0) * 1000
        result = reply.result if isinstance(reply.result, dict) else {}
        ctx.emit(
            {"device_id": target, "ok": True, "ms": round(ms, 2), "result": result},
            lambda c: c.print(f"{target}: pong in {ms:.1f} ms (agent {result.get('agent_version', '?')})"),
        )  # fmt: skip
        return 0
    return ping_many(args, ctx, target)


def ping_many(args: argparse.Namespace, ctx: Context, target: str) -> int:
    group = None
    if target.startswith(GROUP_PREFIX):
        try:
            group = group_name(target[len(GROUP_PREFIX) :])
        except TopicError as exc:
            raise FleetError(FleetCode.BAD_INPUT, str(exc)) from None
    timeout = _timeout(args, ctx)
    client = ctx.client()
    view = ctx.view()
    rows = view.rows(group)
    if not rows:
        where = f"in group {group}" if group else "at all"
        raise FleetError(FleetCode.UNKNOWN_DEVICE, f"no devices seen {where} on "
                         f"{ctx.config.broker.url}")  # fmt: skip
    started = time.perf_counter()
    futures: dict[Future[Reply], str] = {}
    sent_at: dict[str, float] = {}
    for row in rows:
        sent_at[row.device_id] = time.perf_counter()
        future = client.submit(row.device_id, "ping", timeout_s=timeout, wait_offline=args.wait)
        futures[future] = row.device_id
    results: dict[str, dict[str, Any]] = {}
    last_progress = 0.0
    for n, future in enumerate(as_completed(futures), 1):
        device = futures[future]
        ms = round((time.perf_counter() - sent_at[device]) * 1000, 2)
        try:
            reply = future.result()
        except FleetError as exc:
            results[device] = {"device_id": device, "ok": False, "code": exc.code.value,
                               "message": exc.message}  # fmt: skip
        else:
            if reply.ok:
                results[device] = {"device_id": device, "ok": True, "ms": ms}
            else:
                code = reply.error.code if reply.error else "?"
                msg = reply.error.message if reply.error else ""
                results[device] = {"device_id": device, "ok": False, "code": code, "message": msg}
        now = time.perf_counter()
        if n == len(futures) or now - last_progress >= 0.5:
            last_progress = now
            ok = sum(1 for r in results.values() if r["ok"])
            ctx.progress(f"ping {target}: {n}/{len(futures)} answered, {ok} ok, "
                         f"{n - ok} failed ({now - started:.1f} s)")  # fmt: skip
    ordered = [results[r.device_id] for r in rows]
    failed = [r for r in ordered if not r["ok"]]

    def human(console: Console) -> None:
        from rich.table import Table

        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for col in ("device", "result", "ms / why"):
            table.add_column(col, no_wrap=col != "ms / why")
        for r in ordered:
            if r["ok"]:
                table.add_row(r["device_id"], "[green]pong[/]", f"{r['ms']:.1f}")
            else:
                table.add_row(r["device_id"], f"[red]{r['code']}[/]", r["message"])
        console.print(table)
        console.print(f"{len(ordered) - len(failed)}/{len(ordered)} answered ping")

    ctx.emit({"target": target, "results": ordered, "failed": len(failed)}, human)
    return 1 if failed else 0


# ------------------------------------------------------------------------ status, logs


def run_status(args: argparse.Namespace, ctx: Context) -> int:
    reply = request(ctx, args, args.device, "status", {})
    row = ctx.view().row(args.device)
    data: dict[str, Any] = {"device_id": args.device, "status": reply.result}
    if row is not None:
        from fleet.cli.devices import row_json

        data["row"] = row_json(row)

    def human(console: Console) -> None:
        _pretty(console, reply.result)
        print_selection(console, reply.result)

    ctx.emit(data, human)
    return 0


def run_logs(args: argparse.Namespace, ctx: Context) -> int:
    if not 1 <= args.lines <= 100000:
        raise FleetError(FleetCode.BAD_INPUT, f"--lines {args.lines} must be 1-100000")
    cmd: dict[str, Any] = {"lines": args.lines}
    if args.level:
        cmd["level"] = args.level
    reply = request(ctx, args, args.device, "logs", cmd)
    result = reply.result if isinstance(reply.result, dict) else {}
    lines = [str(line) for line in result.get("lines", [])]

    def human(console: Console) -> None:
        for line in lines:
            console.print(line, markup=False, highlight=False)

    ctx.emit({"device_id": args.device, "lines": lines}, human)
    return 0


# ------------------------------------------------------------------------ config


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; each value a JSON scalar (5, 0.5, true, null, "text"), else
    the text itself (`log_level=debug`)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FleetError(
                FleetCode.BAD_INPUT, f"{item!r} is not key=value (e.g. log_level=debug)"
            )
        if key in values:
            raise FleetError(FleetCode.BAD_INPUT, f"{key} is given twice")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, dict | list):
            raise FleetError(FleetCode.BAD_INPUT, f"{key}={raw}: values are scalars "
                             "(numbers, true/false, text), not objects or lists")  # fmt: skip
        if isinstance(value, float) and not math.isfinite(value):
            raise FleetError(FleetCode.BAD_INPUT, f"{key}={raw}: not a finite number")
        values[key] = value
    return values


def run_config_set(args: argparse.Namespace, ctx: Context) -> int:
    values = parse_assignments(args.values)
    reply = request(ctx, args, args.device, "config.set", {"values": values})
    result = reply.result if isinstance(reply.result, dict) else {}
    applied = result.get("applied", {})

    def human(console: Console) -> None:
        for key, value in applied.items():
            console.print(f"{args.device}: {key} = {json.dumps(value)}", markup=False)

    ctx.emit({"device_id": args.device, "applied": applied}, human)
    return 0


def run_config_get(args: argparse.Namespace, ctx: Context) -> int:
    cmd: dict[str, Any] = {"keys": list(args.keys)} if args.keys else {}
    reply = request(ctx, args, args.device, "config.get", cmd)
    ctx.emit({"device_id": args.device, **(reply.result or {})},
             lambda c: _pretty(c, reply.result))  # fmt: skip
    return 0


# ------------------------------------------------------------------------ infer


def load_inputs(path: Path, name: str) -> list[dict[str, Any]]:
    """KServe v2 input tensors from a .npy file or a JSON file (`{"inputs": [...]}` or
    the list itself); FleetError(console.bad_input) naming the file and what is wrong."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FleetError(FleetCode.BAD_INPUT, f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_INPUT_BYTES:
        raise FleetError(FleetCode.BAD_INPUT, f"{path} is {size} bytes; a command carries at "
                         f"most {MAX_INPUT_BYTES // (1 << 20)} MiB")  # fmt: skip
    if path.suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FleetError(FleetCode.BAD_INPUT, f"{path} is not a .npy array: {exc}") from None
        datatype = DATATYPES.get(str(array.dtype))
        if datatype is None:
            raise FleetError(FleetCode.BAD_INPUT, f"{path}: dtype {array.dtype} has no KServe "
                             f"datatype (use one of {', '.join(DATATYPES)})")  # fmt: skip
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise FleetError(FleetCode.BAD_INPUT, f"{path} holds NaN or infinite values")
        return [{"name": name, "datatype": datatype, "shape": list(array.shape),
                 "data": array.reshape(-1).tolist()}]  # fmt: skip
    try:
        from agent.protocol.messages import loads

        doc = loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise FleetError(
            FleetCode.BAD_INPUT, f"{path} is not a .npy file nor JSON: {exc}"
        ) from None
    inputs = doc.get("inputs") if isinstance(doc, dict) else doc
    if (
        not isinstance(inputs, list)
        or not inputs
        or not all(
            isinstance(t, dict) and {"name", "datatype", "shape", "data"} <= set(t) for t in inputs
        )
    ):
        raise FleetError(FleetCode.BAD_INPUT, f"{path}: KServe v2 JSON needs \"inputs\": a list of "
                         '{"name", "datatype", "shape", "data"} tensors')  # fmt: skip
    return inputs


def run_infer(args: argparse.Namespace, ctx: Context) -> int:
    inputs = load_inputs(args.input, args.name)
    cmd: dict[str, Any] = {"inputs": inputs}
    if args.model:
        cmd["model"] = args.model
    reply = request(ctx, args, args.device, "infer", cmd)
    result = reply.result if isinstance(reply.result, dict) else {}
    outputs = result.get("outputs", [])

    def human(console: Console) -> None:
        head = f"{result.get('model_name', '?')} {result.get('model_version', '')}".strip()
        console.print(f"{args.device}: {head}", markup=False)
        for out in outputs:
            data = out.get("data", [])
            shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in data[:16])
            more = f", … ({len(data)} values)" if len(data) > 16 else ""
            console.print(f"  {out.get('name')} {out.get('datatype')} {out.get('shape')}: "
                          f"[{shown}{more}]", markup=False)  # fmt: skip

    ctx.emit({"device_id": args.device, **result}, human)
    return 0
