"""The local API's endpoints: which methods each path takes, and what it answers.

`Router.resolve` needs only the request head, so a wrong path or method is refused
before any body is read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.api.bodies import json_cost
from agent.api.http import (
    EndpointNotFoundError,
    MethodNotAllowedError,
    RequestHead,
    Response,
    UnsupportedMediaError,
    error_response,
    json_response,
)
from agent.api.kserve import (
    HEADER_LENGTH,
    decode_request,
    encode_response,
    loads_bounded,
    selected_outputs,
    shm_outputs,
    tensor_metadata,
    wants_binary,
)
from agent.api.shm import SharedMemoryRegistry, ShmError
from agent.errors import BadRequestError, ServingError
from agent.serving import ModelHost

log = logging.getLogger(__name__)

_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/stats)?")
_SHM = re.compile(r"/v2/systemsharedmemory/region/([^/]+)/(register|status|unregister)")
_READ = ("GET", "HEAD")
Body = bytes | bytearray
# Content types an infer body may declare: JSON, or the binary extension's octet-stream.
_BODY_TYPES = ("application/json", "application/octet-stream")


@dataclass(slots=True)  # made per request: a frozen dataclass costs microseconds
class Route:
    methods: tuple[str, ...]
    # (head, body, path groups) -> response
    handler: Callable[[RequestHead, Body, tuple[str | None, ...]], Response]
    groups: tuple[str | None, ...] = ()
    takes_body: bool = False


class Router:
    def __init__(
        self,
        host: ModelHost,
        status: Callable[[], dict[str, Any]],
        metrics_text: Callable[[], str],
        reserve: Callable[[int, str], int],
        release: Callable[[int], None],
        shm: SharedMemoryRegistry,
    ) -> None:
        self.host = host
        self.shm = shm
        self.status = status
        self.metrics_text = metrics_text
        # Extra memory a JSON body costs once decoded is admitted like the body itself.
        self._reserve = reserve
        self._release = release
        self._exact: dict[str, Route] = {
            "/v2/health/live": Route(_READ, self._live),
            "/v2/health/ready": Route(_READ, self._ready),
            "/v2": Route(_READ, self._server_metadata),
            "/metrics": Route(_READ, self._metrics),
            "/v2/edgerun/status": Route(_READ, self._status),
            "/v2/models/stats": Route(_READ, self._stats),
            "/v2/systemsharedmemory/status": Route(_READ, self._shm_status),
            "/v2/systemsharedmemory/unregister": Route(("POST",), self._shm_unregister),
        }
        self._actions = {
            None: self._model_metadata,
            "/ready": self._model_ready,
            "/stats": self._stats,
            "/infer": self._infer,
        }

    def resolve(self, head: RequestHead) -> Route:
        route = self._exact.get(head.path)
        if route is None and head.path.startswith("/v2/systemsharedmemory/"):
            route = self._shm_route(head)
        if route is None:
            match = _MODEL.fullmatch(head.path)
            if match is None:
                raise EndpointNotFoundError(f"no such endpoint: {head.method} {head.path[:200]}")
            action = match.group(3)
            handler = self._actions[action]
            methods = ("POST",) if action == "/infer" else _READ
            route = Route(methods, handler, (match.group(1), match.group(2)), action == "/infer")
        if head.method not in route.methods:
            allow = ", ".join(route.methods)
            raise MethodNotAllowedError(
                f"{head.method} is not allowed on {head.path[:200]}; use {allow}", {"allow": allow}
            )
        if route.takes_body:
            _check_media(head)
        return route

    def _shm_route(self, head: RequestHead) -> Route:
        match = _SHM.fullmatch(head.path)
        if match is None:
            raise EndpointNotFoundError(f"no such endpoint: {head.method} {head.path[:200]}")
        action = match.group(2)
        if action == "status":
            return Route(_READ, self._shm_status, (match.group(1),))
        handler = self._shm_register if action == "register" else self._shm_unregister
        return Route(("POST",), handler, (match.group(1),), takes_body=True)

    def dispatch(self, route: Route, head: RequestHead, body: Body) -> Response:
        try:
            return route.handler(head, body, route.groups)
        except ServingError as exc:
            return error_response(exc)
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("unhandled error serving %s %s", head.method, head.path)
            return json_response(
                500, {"error": f"internal error: {type(exc).__name__}", "code": "internal"}
            )

    # ------------------------------------------------------------- endpoints

    def _live(self, *_: Any) -> Response:
        return json_response(200, {"live": True})

    def _ready(self, *_: Any) -> Response:
        ready = self.host.ready()
        return json_response(200 if ready else 503, {"ready": ready})

    def _server_metadata(self, *_: Any) -> Response:
        return json_response(
            200,
            {
                "name": "edgerun",
                "version": __version__,
                "extensions": [
                    "binary_tensor_data",
                    "statistics",
                    "system_shared_memory",
                    "edgerun_status",
                ],
            },
        )

    def _metrics(self, *_: Any) -> Response:
        text = self.metrics_text().encode()
        return 200, text, {"content-type": "text/plain; version=0.0.4; charset=utf-8"}

    def _status(self, *_: Any) -> Response:
        return json_response(200, self.status())

    def _model_metadata(
        self, _h: RequestHead, _b: Body, groups: tuple[str | None, ...]
    ) -> Response:
        model = self.host.resolve(groups[0] or "", groups[1])
        manifest = model.manifest
        return json_response(
            200,
            {
                "name": manifest.name,
                "versions": [manifest.version],
                "platform": model.runtime.platform,
                "inputs": [tensor_metadata(s) for s in manifest.inputs],
                "outputs": [tensor_metadata(s) for s in manifest.outputs],
                "parameters": {
                    "sha256": model.sha256,
                    "labels": list(manifest.labels),
                    "runtime": model.runtime.describe(),
                },
            },
        )

    def _model_ready(self, _h: RequestHead, _b: Body, groups: tuple[str | None, ...]) -> Response:
        self.host.resolve(groups[0] or "", groups[1])
        return json_response(200, {"name": groups[0], "ready": self.host.ready()})

    def _stats(self, _h: RequestHead, _b: Body, groups: tuple[str | None, ...]) -> Response:
        """Triton's statistics extension (tritonclient's get_inference_statistics)."""
        model = self.host.model
        if groups:
            model = self.host.resolve(groups[0] or "", groups[1])
        if model is None:
            return json_response(200, {"model_stats": []})
        m = self.host.metrics
        totals = m.window(reset=False)["total"]
        ns = int(m.latency.total * 1e9)
        requests = int(totals["requests"])

        def stat(count: int, nanos: int = 0) -> dict[str, int]:
            return {"count": count, "ns": nanos}

        entry = {
            "name": model.manifest.name,
            "version": model.manifest.version,
            "last_inference": 0,
            "inference_count": int(totals["items"]),
            "execution_count": m.runtime_batch.count,
            "inference_stats": {
                "success": stat(requests, ns),
                "fail": stat(int(totals["errors"])),
                "queue": stat(requests),
                "compute_input": stat(requests),
                "compute_infer": stat(requests, ns),
                "compute_output": stat(requests),
                "cache_hit": stat(0),
                "cache_miss": stat(0),
            },
            "batch_stats": [],
        }
        return json_response(200, {"model_stats": [entry]})

    # ------------------------------------------------------------- shared memory

    def _shm_register(
        self, head: RequestHead, body: Body, groups: tuple[str | None, ...]
    ) -> Response:
        request = loads_bounded(body, "register body") if body else None
        self.shm.register(groups[0] or "", request, head.caller)
        return json_response(200, {})

    def _shm_unregister(
        self, head: RequestHead, _b: Body, groups: tuple[str | None, ...]
    ) -> Response:
        # Who may register may unregister: the same caller rule.
        self.shm.check_caller(head.caller)
        self.shm.unregister(groups[0] if groups else None)
        return json_response(200, {})

    def _shm_status(self, head: RequestHead, _b: Body, groups: tuple[str | None, ...]) -> Response:
        self.shm.check_caller(head.caller)
        return json_response(200, self.shm.status(groups[0] if groups else None))

    def _infer(self, head: RequestHead, body: Body, groups: tuple[str | None, ...]) -> Response:
        name, version = groups[0] or "", groups[1]
        header_len = head.headers.get(HEADER_LENGTH)
        try:
            if header_len is not None and not header_len.isdigit():
                raise BadRequestError(f"{HEADER_LENGTH} {header_len[:40]!r} is not an integer")
            hlen = int(header_len) if header_len is not None else None
            json_part = body if hlen is None else body[:hlen]
            extra = self._reserve(_json_cost(json_part), "decoded JSON request")
            try:
                regions = self.shm.access(head.caller)
                request, arrays = decode_request(body, hlen, regions)
                targets = shm_outputs(request, regions) if request.get("outputs") else {}
                model, outputs = self.host.infer(name, arrays, version)
            finally:
                self._release(extra)
        except (BadRequestError, ShmError) as exc:
            self.host.metrics.error(exc.code)
            raise
        selected = selected_outputs(request)
        unknown = [s for s in selected if s not in outputs]
        if unknown:
            raise BadRequestError(
                f"requested output {unknown[0]!r} does not exist; outputs: {', '.join(outputs)}"
            )
        try:
            written = {
                out: self.shm.write(region, offset, size, outputs[out], out)
                for out, (region, offset, size) in targets.items()
            }
        except ShmError as exc:  # an output larger than its region, known only now
            self.host.metrics.error(exc.code)
            raise
        rid = request.get("id")
        payload, head_len = encode_response(
            model.manifest.name,
            model.manifest.version,
            rid if isinstance(rid, str) else None,
            outputs,
            wants_binary(request),
            selected,
            written,
        )
        extra_headers = (
            {}
            if head_len is None
            else {
                "inference-header-content-length": str(head_len),
                "content-type": "application/octet-stream",
            }
        )
        return 200, payload, {"content-type": "application/json", **extra_headers}


def _json_cost(data: Body) -> int:
    # Small heads are covered by the body's own reservation; count only what matters.
    return json_cost(data) if len(data) > 4096 else 0


def _check_media(head: RequestHead) -> None:
    encoding = head.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaError(
            f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed",
            {"accept-encoding": "identity"},
        )
    ctype = head.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media not in _BODY_TYPES:
            raise UnsupportedMediaError(
                f"Content-Type {ctype[:60]!r} is not supported; send application/json "
                "(curl: -H 'Content-Type: application/json') or application/octet-stream "
                "with Inference-Header-Content-Length"
            )
