"""`edge-fleet history` (read the record) and `edge-fleet db migrate|status`.

Neither needs the broker nor the signing key: only the record, from `--db`, `db` in
fleet.toml, or ./fleet.db.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from fleet.errors import FleetCode, FleetError
from fleet.ports import Record, RecordKind
from fleet.store import DEFAULT_DB, SqlStore, open_store

MAX_LIMIT = 100_000


def register(sub: Any) -> None:
    history = sub.add_parser(
        "history", help="what the consoles did: who, what, when, result (the record)"
    )
    history.add_argument("--rollout", default=None, metavar="ID", help="one rollout's records")
    history.add_argument("--device", default=None, metavar="D", help="one device's records")
    history.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="K",
        help="only these kinds (repeat or comma-separate), e.g. gate.result,device.outcome",
    )
    history.add_argument("--limit", type=int, default=50, help="the latest N (default 50)")
    _json_flag(history)
    history.set_defaults(run=run_history)

    db = sub.add_parser("db", help="the record's schema: status, migrate")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    status = db_sub.add_parser("status", help="schema version of the record and what is pending")
    _json_flag(status)
    status.set_defaults(run=run_db_status)
    migrate = db_sub.add_parser("migrate", help="apply pending migrations (one transaction)")
    _json_flag(migrate)
    migrate.set_defaults(run=run_db_migrate)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    # `edge-fleet history --json` as well as `edge-fleet --json history`; SUPPRESS keeps
    # the global flag's value when this one is not given.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )


# --------------------------------------------------------------------- helpers


def db_url(args: argparse.Namespace, ctx: Any) -> str:
    """--db, else `db` in fleet.toml (--config or ./fleet.toml), else ./fleet.db.
    These commands open the record themselves (not `ctx.store()`): `db status` must
    not migrate it and neither may create a missing file."""
    if getattr(args, "db", None):
        return str(args.db)
    config = getattr(ctx, "config", None)
    if config is None:
        from fleet.config import FleetConfig

        config = FleetConfig.load(getattr(args, "config", None))
    return str(config.db or DEFAULT_DB)


def _kinds(values: list[str]) -> list[RecordKind] | None:
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        return None
    kinds = []
    for name in names:
        try:
            kinds.append(RecordKind(name))
        except ValueError:
            known = ", ".join(k.value for k in RecordKind)
            raise FleetError(
                FleetCode.BAD_INPUT, f"--kind {name!r} is not a record kind: one of {known}"
            ) from None
    return kinds


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def record_json(record: Record) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "ts": record.ts,
        "time": datetime.fromtimestamp(record.ts, UTC).isoformat(timespec="milliseconds"),
        "key_id": record.key_id,
        "operator": record.operator,
        "kind": str(record.kind),
        "rollout_id": record.rollout_id,
        "device_id": record.device_id,
        "result": record.result,
        "data": dict(record.data),
    }


def _detail(data: Any, width: int = 60) -> str:
    text = json.dumps(data, separators=(",", ":"), sort_keys=True) if data else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    top = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    return "\n".join(line.rstrip() for line in [top, *lines])


# -------------------------------------------------------------------- commands


def run_history(args: argparse.Namespace, ctx: Any) -> int:
    if not 0 < args.limit <= MAX_LIMIT:
        raise FleetError(
            FleetCode.BAD_INPUT, f"--limit {args.limit} is out of range: 1 to {MAX_LIMIT}"
        )
    kinds = _kinds(args.kind)
    # Reading never creates a record file (a mistyped --db must not look empty).
    with open_store(db_url(args, ctx), create=False) as store:
        records = store.records(
            rollout_id=args.rollout,
            device_id=args.device,
            kinds=kinds,
            limit=args.limit,
            newest_first=True,
        )
        if (
            not records
            and args.rollout is not None
            and not store.records(rollout_id=args.rollout, limit=1)
        ):
            raise FleetError(
                FleetCode.NOT_FOUND,
                f"no rollout {args.rollout!r} in the record {store.where}: "
                "`edge-fleet rollout list` shows the rollouts there",
            )
    records.reverse()  # oldest first, the latest at the bottom, as a log reads
    if ctx.json:
        print(json.dumps({"records": [record_json(r) for r in records]}))
        return 0
    if not records:
        print("no records match", file=sys.stderr)
        return 0
    rows = [
        [
            str(r.seq),
            _when(r.ts),
            f"{r.operator} ({r.key_id})",
            str(r.kind),
            r.rollout_id or "",
            r.device_id or "",
            r.result or "",
            _detail(r.data),
        ]
        for r in records
    ]
    print(_table(rows, ["SEQ", "WHEN (UTC)", "WHO", "WHAT", "ROLLOUT", "DEVICE", "RESULT", "DATA"]))
    return 0


def _status_json(store: SqlStore) -> dict[str, Any]:
    status = store.schema()
    return {
        "store": store.dialect,
        "where": store.where,
        "schema_version": status.current,
        "supported_version": status.latest,
        "pending": list(status.pending),
        "too_new": status.too_new,
    }


def run_db_status(args: argparse.Namespace, ctx: Any) -> int:
    url = db_url(args, ctx)
    try:
        store = open_store(url, migrate=False)
    except FleetError as exc:
        if exc.code is not FleetCode.NOT_FOUND:
            raise
        # No file yet is a normal state, not a failure.
        if ctx.json:
            print(json.dumps({"store": "sqlite", "where": url, "exists": False}))
        else:
            print(exc.message)
        return 0
    with store:
        out = _status_json(store)
    if ctx.json:
        print(json.dumps({**out, "exists": True}))
        return 0
    print(f"record: {out['store']} {out['where']}")
    current, latest = out["schema_version"], out["supported_version"]
    if out["too_new"]:
        print(
            f"schema version {current} is newer than this edge-fleet knows ({latest}): "
            "upgrade edgerun here before using this record"
        )
    elif out["pending"]:
        print(
            f"schema version {current} of {latest}; pending: {', '.join(out['pending'])} "
            "(`edge-fleet db migrate` applies them; any command that records does too)"
        )
    else:
        print(f"schema version {current}: up to date")
    return 0


def run_db_migrate(args: argparse.Namespace, ctx: Any) -> int:
    with open_store(db_url(args, ctx), migrate=False, create=True) as store:
        before = store.schema().current
        applied = store.migrate()  # refuses a schema newer than this code
        out = _status_json(store)
    if ctx.json:
        print(json.dumps({**out, "from_version": before, "applied": applied}))
        return 0
    if applied:
        print(
            f"record {out['where']}: schema version {before} -> {out['schema_version']} "
            f"({', '.join(applied)})"
        )
    else:
        print(f"record {out['where']}: already at schema version {out['schema_version']}")
    return 0
