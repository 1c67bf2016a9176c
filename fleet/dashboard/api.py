"""The dashboard's JSON endpoints (the contract: docs/DESIGN.md "Dashboard HTTP API").

Every error is `{"error": {"code", "message"}}` with a fitting status; a bad query
parameter is 400 naming what is allowed. Reads that touch the store run in the thread
pool (sync endpoints), so a slow database never stalls the event loop or the SSE hub.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fleet.dashboard import rows as rowq
from fleet.dashboard.auth import COOKIE, Auth, Session
from fleet.dashboard.devlog import DeviceLog
from fleet.dashboard.live import LiveHub
from fleet.dashboard.retention import TelemetryStore
from fleet.dashboard.rollouts import RolloutCache
from fleet.errors import FleetCode, FleetError
from fleet.ports import Record, RecordKind, Store, View
from fleet.rollout.control import REQUESTS, request, rollout_rows

BAD = FleetCode.BAD_INPUT.value


class ApiCode(StrEnum):
    """The dashboard's own error codes (HTTP answers only; everything the console's core
    refuses keeps its FleetCode, e.g. console.bad_input, console.not_found)."""

    READ_ONLY = "dashboard.read_only"  # 403: started without credentials
    BAD_CREDENTIALS = "dashboard.bad_credentials"  # 401: wrong user, password or token
    LOGIN_REQUIRED = "dashboard.login_required"  # 401: an action without a session
    CSRF = "dashboard.csrf"  # 403: X-CSRF-Token missing or not the session's
    RATE_LIMITED = "dashboard.rate_limited"  # 429: 5 failed logins a minute
    NOT_FOUND = "dashboard.not_found"  # 404: no such path
    HTTP = "dashboard.http"  # another HTTP error (405 ...)
    INTERNAL = "dashboard.internal"  # 500: the trace is in the server's log only


EVENTS_SHOWN = 100
REASON_MAX = 500
MAX_BODY = 64 * 1024
_STATUS = {
    FleetCode.NOT_FOUND: 404,
    FleetCode.BAD_INPUT: 409,  # a request the rollout's state refuses (already paused…)
    FleetCode.STORE: 503,
    FleetCode.LEASE: 409,
}


def error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status)


def fleet_error(exc: FleetError) -> JSONResponse:
    return JSONResponse({"error": exc.to_json()}, _STATUS.get(exc.code, 400))


class BadParam(Exception):
    def __init__(self, name: str, message: str, allowed: list[str] | None = None) -> None:
        super().__init__(message)
        self.name, self.message, self.allowed = name, message, allowed

    def response(self) -> JSONResponse:
        extra: dict[str, Any] = {"param": self.name}
        if self.allowed is not None:
            extra["allowed"] = self.allowed
        return error(400, BAD, self.message, **extra)


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadParam(name, f"{name}={text[:40]!r} is not allowed: a whole number {low}-{high}")
    return value


def _float(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadParam(name, f"{name}={text[:40]!r} is not allowed: Unix seconds (a number ≥ 0)")
    return value


@dataclass
class Dashboard:
    """Everything the endpoints share; one per app."""

    view: View
    store: Store | None
    auth: Auth
    hub: LiveHub
    devlog: DeviceLog
    key_id: str = ""  # the console key id recorded as who (with the logged-in user)
    retention_s: float = 24 * 3600.0
    read_only_reason: str = ""
    _bundle_versions: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    _rollouts: RolloutCache | None = None

    # ------------------------------------------------------------------ helpers

    def session_of(self, request: Request) -> Session | None:
        return self.auth.session(request.cookies.get(COOKIE))

    def _store(self) -> Store:
        if self.store is None:
            raise FleetError(FleetCode.STORE, "this dashboard has no record store")
        return self.store

    # ------------------------------------------------------------------ devices

    def devices(self, request: Request) -> Response:
        try:
            group = request.query_params.get("group") or None
            q = request.query_params.get("q", "")[:200]
            sort = request.query_params.get("sort") or "device_id"
            if sort not in rowq.SORT_FIELDS:
                raise BadParam(
                    "sort",
                    f"sort={sort[:40]!r} is not a column: one of {', '.join(rowq.SORT_FIELDS)}",
                    list(rowq.SORT_FIELDS),
                )
            desc_text = request.query_params.get("desc", "0")
            if desc_text not in ("0", "1", "true", "false"):
                raise BadParam(
                    "desc", f"desc={desc_text[:40]!r} is not allowed: 0 or 1", ["0", "1"]
                )
            offset = _int(request, "offset", 0, 0, 10**9)
            limit = _int(request, "limit", 100, 1, rowq.MAX_LIMIT)
        except BadParam as bad:
            return bad.response()
        now = time.time()
        every = self.view.rows()
        groups = rowq.groups_of(every)
        if group is not None:
            every = [r for r in every if group in r.groups]
        stale_of = self.devlog.stale_s
        found = rowq.query(every, q=q, sort=sort, desc=desc_text in ("1", "true"), now=now,
                           stale_of=stale_of)  # fmt: skip
        page = [
            rowq.row_json(r, now, stale_of(r.device_id)) for r in found[offset : offset + limit]
        ]
        return JSONResponse(
            {
                "total": len(found),
                "offset": offset,
                "limit": limit,
                "groups": groups,
                "rows": page,
            }
        )

    def device(self, request: Request) -> Response:
        device_id = request.path_params["device_id"]
        row = self.view.row(device_id)
        if row is None:
            return error(
                404,
                FleetCode.UNKNOWN_DEVICE.value,
                f"no device {device_id[:80]!r} has been seen on the broker",
            )
        events = self.devlog.events(device_id)[-EVENTS_SHOWN:]
        try:
            models = self._models(device_id)
        except FleetError as exc:
            return fleet_error(exc)
        return JSONResponse(
            {
                "row": rowq.row_json(row, None, self.devlog.stale_s(device_id)),
                "events": events,
                "models": models,
            }
        )

    def _models(self, device_id: str) -> list[dict[str, Any]]:
        """The models a device served: what rollouts did to it (the record) and what this
        server saw in its retained state, oldest first."""
        seen = self.devlog.models(device_id)
        recorded: list[dict[str, Any]] = []
        if self.store is not None:
            kinds = [RecordKind.DEVICE_OUTCOME, RecordKind.DEVICE_ROLLED_BACK]
            for r in self.store.records(device_id=device_id, kinds=kinds):
                entry = self._model_entry(r)
                if entry is not None:
                    recorded.append(entry)
        merged = sorted(recorded + seen, key=lambda m: m["ts"] or 0.0)
        out: list[dict[str, Any]] = []
        for m in merged:
            # The same version seen again right after a rollout put it there: one entry,
            # the one that says which rollout.
            if out and out[-1]["version"] == m["version"]:
                if out[-1]["via"] is None and m["via"] is not None:
                    out[-1] = {**m, "sha256": m["sha256"] or out[-1]["sha256"]}
                continue
            out.append(m)
        row = self.view.row(device_id)
        if (
            row is not None
            and row.model_version
            and (not out or out[-1]["version"] != row.model_version)
        ):
            out.append({"ts": row.seen_at, "version": row.model_version,
                        "sha256": row.model_sha256, "via": None})  # fmt: skip
        return out

    def _model_entry(self, r: Record) -> dict[str, Any] | None:
        if r.kind is RecordKind.DEVICE_OUTCOME:
            if r.result != "succeeded" or r.rollout_id is None:
                return None
            version, sha = self._bundle_of(r.rollout_id)
            return None if version is None else {"ts": r.ts, "version": version,
                                                 "sha256": sha, "via": r.rollout_id}  # fmt: skip
        if r.kind is RecordKind.DEVICE_ROLLED_BACK and r.result == "ok":
            to = r.data.get("to_version")
            if isinstance(to, str) and to:
                return {"ts": r.ts, "version": to, "sha256": None, "via": r.rollout_id}
        return None

    def _bundle_of(self, rollout_id: str) -> tuple[str | None, str | None]:
        if rollout_id not in self._bundle_versions:
            store = self._store()
            first = store.records(rollout_id=rollout_id, kinds=[RecordKind.ROLLOUT_CREATED])
            bundle = first[0].data.get("bundle", {}) if first else {}
            self._bundle_versions[rollout_id] = (bundle.get("version"), bundle.get("sha256"))
        return self._bundle_versions[rollout_id]

    def telemetry(self, request: Request) -> Response:
        device_id = request.path_params["device_id"]
        try:
            since = _float(request, "since")
        except BadParam as bad:
            return bad.response()
        if self.view.row(device_id) is None:
            return error(
                404,
                FleetCode.UNKNOWN_DEVICE.value,
                f"no device {device_id[:80]!r} has been seen on the broker",
            )
        if since is None:
            since = time.time() - self.retention_s
        store = self.store
        if store is None or not hasattr(store, "telemetry"):
            samples = []
        else:
            tstore: TelemetryStore = store  # type: ignore[assignment]
            try:
                samples = tstore.telemetry(device_id=device_id, since=since, limit=100_000)
            except FleetError as exc:
                return fleet_error(exc)
        cols: dict[str, list[Any]] = {
            k: [] for k in ("ts", "p95_ms", "rate_per_s", "error_rate", "rss_mb", "temperature_c")
        }
        for s in samples:
            for k, values in cols.items():
                values.append(getattr(s, k))
        return JSONResponse(cols)

    # ------------------------------------------------------------------ rollouts

    def rollouts(self, request: Request) -> Response:
        try:
            limit = _int(request, "limit", 50, 1, 1000)
            return JSONResponse({"rollouts": rollout_rows(self._store(), limit)})
        except BadParam as bad:
            return bad.response()
        except FleetError as exc:
            return fleet_error(exc)

    def rollout(self, request: Request) -> Response:
        rid = request.path_params["rollout_id"]
        try:
            body = self.rollout_cache(self._store()).body(rid)
            return Response(body, media_type="application/json")
        except FleetError as exc:
            return fleet_error(exc)

    def rollout_cache(self, store: Store) -> RolloutCache:
        if self._rollouts is None:
            self._rollouts = RolloutCache(store)
        return self._rollouts

    # ------------------------------------------------------------------ session

    def session(self, request: Request) -> Response:
        s = self.session_of(request)
        return JSONResponse(
            {
                "logged_in": s is not None,
                "user": s.user if s else None,
                "csrf": s.csrf if s else None,
                "read_only": not self.auth.enabled,
                "read_only_reason": self.read_only_reason if not self.auth.enabled else "",
            }
        )

    async def login(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        wait = self.auth.limited(client)
        if wait > 0:
            return _too_many(client, wait)
        if not self.auth.enabled:
            return error(
                403,
                ApiCode.READ_ONLY,
                "this dashboard is read-only: it was started without credentials "
                "(edge-fleet serve --credentials FILE or --token-file FILE)",
            )
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        user = body.get("user")
        password = body.get("password")
        token = body.get("token")
        if isinstance(token, str) and token and user is None and password is None:
            ok = self.auth.check_token(token)
            name = "token"
        elif isinstance(user, str) and user and isinstance(password, str) and token is None:
            ok = await asyncio.to_thread(self.auth.check_password, user, password)
            name = user
        else:
            return error(400, BAD, 'send {"user": "…", "password": "…"} or {"token": "…"} as JSON')
        if not ok:
            self.auth.failed(client)
            return error(401, ApiCode.BAD_CREDENTIALS, "wrong user name, password or token")
        s = self.auth.open_session(name)
        response = JSONResponse({"user": s.user, "csrf": s.csrf})
        response.headers.append("set-cookie", session_cookie(s.sid, request.url.scheme == "https"))
        return response

    def logout(self, request: Request) -> Response:
        self.auth.close_session(request.cookies.get(COOKIE))
        response = JSONResponse({"ok": True})
        response.headers.append(
            "set-cookie", session_cookie("", request.url.scheme == "https", max_age=0)
        )
        return response

    # ------------------------------------------------------------------ actions

    async def action(self, request: Request) -> Response:
        rid = request.path_params["rollout_id"]
        what = request.path_params["action"]
        if what not in REQUESTS:
            return error(404, FleetCode.NOT_FOUND.value, f"no action {what[:40]!r}: one of "
                         f"{', '.join(REQUESTS)}", allowed=list(REQUESTS))  # fmt: skip
        s = self.session_of(request)
        if s is None:
            return error(401, ApiCode.LOGIN_REQUIRED, f"log in to {what} a rollout")
        token = request.headers.get("x-csrf-token", "")
        if not token or not hmac.compare_digest(token.encode(), s.csrf.encode()):
            return error(403, ApiCode.CSRF, "missing or wrong X-CSRF-Token (reload the page)")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return error(415, BAD, "actions take Content-Type: application/json")
        body = await _json_body(request, allow_empty=True)
        if isinstance(body, Response):
            return body
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > REASON_MAX:
            return error(400, BAD, f"reason must be text of at most {REASON_MAX} characters")
        who = (self.key_id, s.user)
        try:
            record = await asyncio.to_thread(self._request, rid, what, who, reason)
        except FleetError as exc:
            return fleet_error(exc)
        return JSONResponse({"ok": True, "record": record})

    def _request(self, rid: str, what: str, who: tuple[str, str], reason: str) -> int:
        store = self._store()
        request(store, rid, what, who, reason or "from the dashboard")
        mine = [
            r
            for r in store.records(rollout_id=rid, kinds=[REQUESTS[what]])
            if (r.key_id, r.operator) == who
        ]
        return mine[-1].seq if mine else 0

    # ------------------------------------------------------------------ live

    async def live(self, request: Request) -> Response:
        wanted = request.query_params.get("devices")
        devices = None
        if wanted is not None:
            devices = frozenset(d for d in wanted.split(",") if d)
            if len(devices) > rowq.MAX_LIMIT:
                return error(400, BAD, f"devices= names {len(devices)} devices: at most "
                             f"{rowq.MAX_LIMIT}", param="devices")  # fmt: skip
        return StreamingResponse(
            self.hub.stream(devices),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def session_cookie(sid: str, secure: bool, max_age: int | None = None) -> str:
    """Written by hand to be exactly the contract's spelling (`SameSite=Strict`); no
    Max-Age: the cookie ends with the browser, the session with its TTL here."""
    parts = [f"{COOKIE}={sid}", "HttpOnly", "SameSite=Strict", "Path=/"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _too_many(client: str, wait: float) -> JSONResponse:
    response = error(
        429,
        ApiCode.RATE_LIMITED,
        f"too many failed logins from {client}: try again in {math.ceil(wait)} s",
    )
    response.headers["Retry-After"] = str(math.ceil(wait))
    return response


async def _json_body(request: Request, *, allow_empty: bool = False) -> dict[str, Any] | Response:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # read with a cap: never hold a huge body
        size += len(chunk)
        if size > MAX_BODY:
            return error(413, BAD, "the body is over 64 KiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip() and allow_empty:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return error(400, BAD, "the body is not JSON")
    if not isinstance(body, dict):
        return error(400, BAD, "the body must be a JSON object")
    return body
