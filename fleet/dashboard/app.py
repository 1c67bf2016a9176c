"""The dashboard's Starlette app: pages, static files, the JSON API and its headers.

    app = create_app(view, store, commander_who="ab12cd34", auth=Auth.from_files(...))
    uvicorn.Server(uvicorn.Config(app, ...)).run()

The app owns the parts it starts (the SSE hub, the device log, telemetry retention)
and stops them at shutdown; the view and the store belong to the caller.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fleet.dashboard.api import ApiCode, Dashboard, error
from fleet.dashboard.auth import Auth
from fleet.dashboard.devlog import DeviceLog
from fleet.dashboard.live import LiveHub
from fleet.dashboard.retention import TelemetryRetention
from fleet.ports import Store, View

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]

_OURS = {h for h, _ in SECURITY_HEADERS}

# Page path -> the HTML file under static/ that renders it (its JS calls the API).
# `/rollouts` falls back to rollout.html (which then lists them) when there is no
# rollouts.html.
PAGES = {
    "index": ("index.html",),
    "device": ("device.html",),
    "rollout": ("rollout.html",),
    "rollouts": ("rollouts.html", "rollout.html"),
    "login": ("login.html",),
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeaders:
    """Adds the contract's headers to every response (pure ASGI: it does not buffer,
    so the SSE stream flows through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        api = str(scope.get("path", "")).startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OURS]
                message["headers"] = headers + SECURITY_HEADERS
                # API answers (a session's CSRF token among them) are never cached.
                if api and not any(k.lower() == b"cache-control" for k, _ in headers):
                    message["headers"].append((b"cache-control", b"no-store"))
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RevalidatedStatic(StaticFiles):
    """Static files with their ETag (StaticFiles sends it) and `no-cache`: the browser
    keeps them and asks again with If-None-Match, getting a 304 while unchanged, so a
    new release is never hidden behind a stale cache."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


class DashboardApp(Starlette):
    """Starlette with the security headers outermost: Starlette puts its 500 handler
    outside every added middleware, and a 500 needs the headers too."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())


def create_app(
    view: View,
    store: Store | None,
    commander_who: str = "",
    auth: Auth | None = None,
    *,
    static_dir: Path | None = None,
    retention_s: float = 24 * 3600.0,
    telemetry_flush_s: float = 1.0,
    prune_s: float = 60.0,
    live_interval_s: float = 0.25,
    ping_s: float = 15.0,
    live_queue: int = 64,
    rollout_poll_s: float = 0.5,
    read_only_reason: str = "",
) -> Starlette:
    """`view`: a started View; `store`: the record (with telemetry: SqlStore) or None;
    `commander_who`: the console key id recorded with the user on every action;
    `auth`: credentials (None or empty: read-only)."""
    auth = auth or Auth()
    static = static_dir or STATIC_DIR
    devlog = DeviceLog(view)
    hub = LiveHub(view, store, interval_s=live_interval_s, ping_s=ping_s, queue_size=live_queue,
                  rollout_poll_s=rollout_poll_s, stale_of=devlog.stale_s)  # fmt: skip
    retention = None
    if store is not None and hasattr(store, "add_telemetry"):
        retention = TelemetryRetention(view, store, retention_s=retention_s,  # type: ignore[arg-type]
                                       flush_s=telemetry_flush_s, prune_s=prune_s)  # fmt: skip
    dash = Dashboard(view, store, auth, hub, devlog, key_id=commander_who,
                     retention_s=retention_s, read_only_reason=read_only_reason)  # fmt: skip

    def page(name: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            for file in PAGES[name]:
                path = static / file
                if path.is_file():
                    return FileResponse(path, headers={"Cache-Control": "no-cache"})
            return PlainTextResponse(f"page {PAGES[name][0]} is not built", 404)

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        if retention is not None:
            retention.start()
        try:
            yield
        finally:
            await hub.stop()
            if retention is not None:
                retention.close()
            devlog.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if request.url.path.startswith("/api/") or status not in (404,):
            detail = exc.detail if isinstance(exc, HTTPException) else "not found"
            code = ApiCode.NOT_FOUND if status == 404 else ApiCode.HTTP
            return error(status, code, f"{request.method} {request.url.path}: {detail}")
        return PlainTextResponse("not found", 404)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Logged here with its traceback; the user gets a stable code, never the trace.
        log.error("dashboard: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": {"code": ApiCode.INTERNAL, "message": "the server failed; see its log"}},
            500,
        )

    routes = [
        Route("/", page("index")),
        Route("/device/{device_id:path}", page("device")),
        Route("/rollout/{rollout_id}", page("rollout")),
        Route("/rollouts", page("rollouts")),
        Route("/login", page("login")),
        Route("/api/devices", dash.devices),
        Route("/api/devices/{device_id}/telemetry", dash.telemetry),
        Route("/api/devices/{device_id}", dash.device),
        Route("/api/rollouts", dash.rollouts),
        Route("/api/rollouts/{rollout_id}", dash.rollout),
        Route("/api/rollouts/{rollout_id}/{action}", dash.action, methods=["POST"]),
        Route("/api/session", dash.session),
        Route("/api/login", dash.login, methods=["POST"]),
        Route("/api/logout", dash.logout, methods=["POST"]),
        Route("/api/live", dash.live),
        Mount("/static", RevalidatedStatic(directory=static, check_dir=False), name="static"),
    ]
    app = DashboardApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found, 404: not_found, 500: server_error},
    )
    app.state.dashboard = dash
    app.state.hub = hub
    app.state.retention = retention
    return app
