"""A rig for over-the-air update tests across real processes (issue 8).

Everything here is a real part: a mosquitto with mutual TLS and the ACL docs/mqtt.md
recommends (`tests/mqtt_broker.py`), an HTTP(S) server in a thread that serves bundle
files with `Range` (and, on request, misbehaves: cuts the connection mid-body, sends
more than it announced, answers an error status), an `edge-agent run` child process with
its MQTT link and an `[update]` table, a console that signs commands with its own key
and collects replies and the device's `events` and retained `state`, a steady-load
generator (client threads on the agent's Unix socket, every failure counted with its
code), and bundle variants of the sample (other versions; broken ones).

Used by tests/system/update/ and bench/update.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.api.client import ApiClient, ApiError
from agent.protocol.canonical import sign_body
from agent.protocol.messages import dumps, loads
from agent.protocol.topics import DeviceTopics, console_reply
from tests.helpers import (
    DEMO_PUB,
    AgentProcess,
    SampleParts,
    make_bundle,
    samples,
    write_config,
)
from tests.mqtt_broker import Broker, Listener, Pki, device_acl, make_pki

DEVICE = "update-dev"
CONSOLE = "console"
MODEL = "digits"


# ----------------------------------------------------------------------------- bundles


@dataclass(frozen=True)
class Release:
    """A bundle file and what a deploy says about it."""

    path: Path
    version: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def deploy_args(self, url: str, **extra: Any) -> dict[str, Any]:
        return {"url": url, "sha256": self.sha256, "size": self.size, "version": self.version,
                **extra}  # fmt: skip


# A live request carries this value in its first pixel; golden cases never do (the
# sample's pixels are 0..16), so a model can misbehave on live traffic alone.
LIVE_MARK = 1000.0


def live_inputs(n: int = 4) -> np.ndarray:
    x, _ = samples()
    out = np.array(x[:n], dtype=np.float32, copy=True)
    out[:, 0, 0, 0] = LIVE_MARK
    return out


def _onnx_only(parts: SampleParts, work: Path, model: Path | None = None,
               golden_outputs: Path | None = None) -> tuple[dict[str, Path], dict[str, Any]]:  # fmt: skip
    """Files and manifest changes of an ONNX-only variant (a changed model.onnx leaves
    the sample's .tflite saying something else, so it is dropped)."""
    src = parts.files()
    files = {
        "model.onnx": model or src["model.onnx"],
        "golden/inputs.npz": src["golden/inputs.npz"],
        "golden/outputs-onnx.npz": golden_outputs or src["golden/outputs-onnx.npz"],
    }
    golden = dict(parts.manifest["golden"])
    golden["outputs"] = {"onnx": "golden/outputs-onnx.npz"}
    return files, {"formats": {"onnx": "model.onnx"}, "golden": golden}


def _edited_model(parts: SampleParts, out: Path, edit: Callable[[Any], None]) -> Path:
    """The sample's ONNX graph with `edit(graph)` applied; the output keeps its name."""
    import onnx

    model = onnx.load(str(parts.files()["model.onnx"]))
    edit(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def _rename_output(graph: Any, new: str) -> str:
    """Make the graph's last node write `new` instead of the output; return the output name."""
    output = graph.output[0].name
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == output:
                node.output[i] = new
    return str(output)


def _nan_on_live(graph: Any) -> None:
    """logits -> NaN for every row whose max pixel is above 100 (live rows, never golden)."""
    from onnx import TensorProto, helper

    out = _rename_output(graph, "logits_raw")
    graph.initializer.extend([
        helper.make_tensor("mark_limit", TensorProto.FLOAT, [], [100.0]),
        helper.make_tensor("nan_value", TensorProto.FLOAT, [], [float("nan")]),
        helper.make_tensor("one_axis", TensorProto.INT64, [1], [1]),
    ])  # fmt: skip
    graph.node.extend([
        helper.make_node("ReduceMax", ["input"], ["row_max"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Greater", ["row_max", "mark_limit"], ["is_live"]),
        helper.make_node("Unsqueeze", ["is_live", "one_axis"], ["is_live2"]),
        helper.make_node("Where", ["is_live2", "nan_value", "logits_raw"], [out]),
    ])  # fmt: skip


def _fat(width: int) -> Callable[[Any], None]:
    """Same answers plus 0 x (a [batch, 64, width] float32 activation): memory-hungry."""

    def edit(graph: Any) -> None:
        from onnx import TensorProto, helper

        out = _rename_output(graph, "logits_raw")
        graph.initializer.extend([
            helper.make_tensor("flat_shape", TensorProto.INT64, [3], [0, -1, 1]),
            helper.make_tensor("fat_shape", TensorProto.INT64, [3], [1, 1, width]),
            helper.make_tensor("fat_axes", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ])  # fmt: skip
        graph.node.extend([
            helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
            helper.make_node("Expand", ["flat", "fat_shape"], ["fat"]),
            helper.make_node("ReduceSum", ["fat", "fat_axes"], ["fat_sum"], keepdims=1),
            helper.make_node("Mul", ["fat_sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["logits_raw", "nothing"], [out]),
        ])  # fmt: skip

    return edit


class Bundles:
    """Variants of the sample bundle, built once per directory."""

    def __init__(self, parts: SampleParts, key: Ed25519PrivateKey, directory: Path) -> None:
        self.parts = parts
        self.key = key
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def _out(self, label: str, version: str) -> Path:
        return self.dir / f"{label}-{version}.edgebundle"

    def good(self, version: str) -> Release:
        """The sample at another version (same model, same answers)."""
        path = self._out("good", version)
        if not path.exists():
            make_bundle(self.parts, path, self.key, version=version)
        return Release(path, version)

    def bad_signature(self, version: str) -> Release:
        """Signed by a key the device does not trust."""
        path = self._out("badsig", version)
        make_bundle(self.parts, path, Ed25519PrivateKey.generate(), version=version)
        return Release(path, version)

    def golden_mismatch(self, version: str) -> Release:
        """Signed and intact, but its golden outputs are not what the model answers."""
        with np.load(self.parts.files()["golden/outputs-onnx.npz"]) as data:
            arrays = {k: np.asarray(data[k]) + np.float32(1.0) for k in data.files}
        golden = self.dir / f"golden-off-{version}.npz"
        np.savez(golden, **arrays)  # type: ignore[arg-type]
        files, changes = _onnx_only(self.parts, self.dir, golden_outputs=golden)
        path = self._out("golden", version)
        make_bundle(self.parts, path, self.key, files=files, version=version, **changes)
        return Release(path, version)

    def permuted(self, version: str) -> Release:
        """Validates (its golden outputs are its own answers) but names another class
        than the sample for every input: a shadow comparison must disagree."""

        def edit(graph: Any) -> None:
            from onnx import TensorProto, helper

            out = _rename_output(graph, "logits_raw")
            order = [(i + 1) % 10 for i in range(10)]
            graph.initializer.extend([helper.make_tensor("order", TensorProto.INT64, [10], order)])
            graph.node.extend([helper.make_node("Gather", ["logits_raw", "order"], [out], axis=1)])

        model = _edited_model(self.parts, self.dir / f"perm-{version}.onnx", edit)
        with np.load(self.parts.files()["golden/outputs-onnx.npz"]) as data:
            arrays = {
                k: np.asarray(data[k])[:, [(i + 1) % 10 for i in range(10)]] for k in data.files
            }
        golden = self.dir / f"golden-perm-{version}.npz"
        np.savez(golden, **arrays)  # type: ignore[arg-type]
        files, changes = _onnx_only(self.parts, self.dir, model=model, golden_outputs=golden)
        path = self._out("perm", version)
        make_bundle(self.parts, path, self.key, files=files, version=version, **changes)
        return Release(path, version)

    def slow(self, version: str, layers: int = 20, width: int = 1024) -> Release:
        """Same answers, ~`layers` x 2 x width^2 more FLOPs a row (20 layers: ~0.6 ms a row
        on a 2-core x86 box, 250: ~9 ms); its manifest
        claims a latency that covers it, so validation passes and only the trial's p95
        against the previous model on this device can catch it."""

        def edit(graph: Any) -> None:
            from onnx import TensorProto, helper, numpy_helper

            out = _rename_output(graph, "logits_raw")
            rng = np.random.default_rng(0)
            w_in = (rng.standard_normal((64, width)) / 8).astype(np.float32)
            w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
            graph.initializer.extend([
                numpy_helper.from_array(w_in, "slow_in"),
                numpy_helper.from_array(w, "slow_w"),
                helper.make_tensor("slow_flat", TensorProto.INT64, [2], [0, -1]),
                helper.make_tensor("slow_zero", TensorProto.FLOAT, [], [0.0]),
                helper.make_tensor("slow_axes", TensorProto.INT64, [1], [1]),
            ])  # fmt: skip
            nodes = [
                helper.make_node("Reshape", ["input", "slow_flat"], ["slow_x"]),
                helper.make_node("MatMul", ["slow_x", "slow_in"], ["slow_h0"]),
            ]
            for i in range(layers):
                nodes.append(
                    helper.make_node("MatMul", [f"slow_h{i}", "slow_w"], [f"slow_h{i + 1}"])
                )
            nodes += [
                helper.make_node(
                    "ReduceSum", [f"slow_h{layers}", "slow_axes"], ["slow_sum"], keepdims=1
                ),
                helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
                helper.make_node("Add", ["logits_raw", "slow_nothing"], [out]),
            ]
            graph.node.extend(nodes)

        model = _edited_model(self.parts, self.dir / f"slow-{version}.onnx", edit)
        files, changes = _onnx_only(self.parts, self.dir, model=model)
        figures = json.loads(json.dumps(self.parts.manifest["figures"]))
        figures["latency_ms"]["onnxruntime"].update({"p50": 500.0, "p90": 600.0, "p99": 800.0,
                                                     "mean": 500.0})  # fmt: skip
        path = self._out("slow", version)
        make_bundle(self.parts, path, self.key, files=files, version=version, figures=figures,
                    **changes)  # fmt: skip
        return Release(path, version)

    def weighty(self, version: str, mb: int = 8) -> Release:
        """Same answers plus 0 x (input @ an `mb` MiB weight): a session of it holds the
        weights, so leaking one per swap shows in RSS (the sample's 150 KB would not)."""
        model = self.dir / f"weighty-{mb}.onnx"
        if not model.exists():

            def edit(graph: Any) -> None:
                from onnx import TensorProto, helper, numpy_helper

                out = _rename_output(graph, "logits_raw")
                cols = mb * (1 << 20) // (64 * 4)
                w = np.random.default_rng(0).standard_normal((64, cols)).astype(np.float32)
                graph.initializer.extend([
                    numpy_helper.from_array(w, "heavy_w"),
                    helper.make_tensor("heavy_flat", TensorProto.INT64, [2], [0, -1]),
                    helper.make_tensor("heavy_zero", TensorProto.FLOAT, [], [0.0]),
                    helper.make_tensor("heavy_axes", TensorProto.INT64, [1], [1]),
                ])  # fmt: skip
                graph.node.extend([
                    helper.make_node("Reshape", ["input", "heavy_flat"], ["heavy_x"]),
                    helper.make_node("MatMul", ["heavy_x", "heavy_w"], ["heavy_h"]),
                    helper.make_node("ReduceSum", ["heavy_h", "heavy_axes"], ["heavy_sum"],
                                     keepdims=1),
                    helper.make_node("Mul", ["heavy_sum", "heavy_zero"], ["heavy_nothing"]),
                    helper.make_node("Add", ["logits_raw", "heavy_nothing"], [out]),
                ])  # fmt: skip

            _edited_model(self.parts, model, edit)
        files, changes = _onnx_only(self.parts, self.dir, model=model)
        # Its matmul costs about a millisecond a row: a budget that covers it on a busy box.
        figures = json.loads(json.dumps(self.parts.manifest["figures"]))
        figures["latency_ms"]["onnxruntime"]["p50"] = 20.0
        path = self._out("weighty", version)
        if not path.exists():
            make_bundle(self.parts, path, self.key, files=files, version=version,
                        figures=figures, **changes)  # fmt: skip
        return Release(path, version)

    def nan_on_live(self, version: str) -> Release:
        """Passes every golden case; answers NaN to live rows (see LIVE_MARK)."""
        model = _edited_model(self.parts, self.dir / f"nan-{version}.onnx", _nan_on_live)
        files, changes = _onnx_only(self.parts, self.dir, model=model)
        path = self._out("nan", version)
        make_bundle(self.parts, path, self.key, files=files, version=version, **changes)
        return Release(path, version)

    def fat(self, version: str, width: int = 1 << 20) -> Release:
        """Same answers, but each row costs 64 x width x 4 bytes of activations
        (256 MiB a row at the default): too big for a small memory cap."""
        model = _edited_model(self.parts, self.dir / f"fat-{version}.onnx", _fat(width))
        files, changes = _onnx_only(self.parts, self.dir, model=model)
        path = self._out("fat", version)
        make_bundle(self.parts, path, self.key, files=files, version=version, **changes)
        return Release(path, version)


# ----------------------------------------------------------------------------- HTTP server


@dataclass
class Route:
    """What the server does for one path."""

    data: bytes
    cut_after: int | None = None  # close the connection after this many body bytes ...
    cuts: int = 1  # ... this many times, then serve normally
    extra: int = 0  # bytes sent beyond the file (and beyond Content-Length when `lie`)
    lie: bool = False  # announce len(data) but send len(data) + extra
    length: bool = True  # False: no Content-Length, the body ends when the server closes
    status: int = 200
    ranges: bool = True  # honour Range (else always 200 with the whole body)
    chunk: int = 16384
    delay_s: float = 0.0  # between chunks


@dataclass
class ServedRequest:
    path: str
    range: str | None
    status: int
    sent: int


class BundleServer:
    """A real HTTP(S) server on 127.0.0.1 in a thread, with Range support."""

    def __init__(self, pki: Pki | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.log: list[ServedRequest] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if pki is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pki.server_cert, pki.server_key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self.host = "localhost" if pki is not None else "127.0.0.1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, path: str, data: bytes, **behaviour: Any) -> str:
        """Serve `data` at `path`; return its URL."""
        self.routes[path] = Route(data, **behaviour)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def requests(self, path: str) -> list[ServedRequest]:
        with self._lock:
            return [r for r in self.log if r.path == path]

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        route = self.routes.get(h.path)
        rng = h.headers.get("Range")
        if route is None:
            self._reply(h, 404, b"not found\n", rng)
            return
        if route.status != 200:
            self._reply(h, route.status, b"refused\n", rng)
            return
        start = 0
        if rng and route.ranges:
            spec = rng.removeprefix("bytes=").split("-")[0]
            start = int(spec) if spec.isdigit() else 0
            if start >= len(route.data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(route.data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                self._record(h.path, rng, 416, 0)
                return
        body = route.data[start:]
        announced = len(body) if route.lie or not route.extra else len(body) + route.extra
        if start:
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(route.data) - 1}/{len(route.data)}")
        else:
            h.send_response(200)
        if route.length:
            h.send_header("Content-Length", str(announced))
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.send_header("Accept-Ranges", "bytes" if route.ranges else "none")
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        body += b"\0" * route.extra
        limit = None
        with self._lock:
            if route.cut_after is not None and route.cuts > 0:
                route.cuts -= 1
                limit = route.cut_after
        sent = 0
        try:
            while sent < len(body):
                if limit is not None and sent >= limit:
                    break
                end = min(len(body), sent + route.chunk)
                if limit is not None:
                    end = min(end, limit)
                h.wfile.write(body[sent:end])
                sent = end
                if route.delay_s:
                    time.sleep(route.delay_s)
            h.wfile.flush()
        except OSError:
            pass
        if limit is not None:
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(2)
        self._record(h.path, rng, 206 if start else 200, sent)

    def _reply(
        self, h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, rng: str | None
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        self._record(h.path, rng, status, len(body))

    def _record(self, path: str, rng: str | None, status: int, sent: int) -> None:
        with self._lock:
            self.log.append(ServedRequest(path, rng, status, sent))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- console


class Console:
    """A fleet console: signs commands, collects replies, `events` and retained `state`."""

    def __init__(
        self, broker: Broker, key: Ed25519PrivateKey, device: str = DEVICE, **kw: Any
    ) -> None:
        self.key = key
        self.device = device
        self.topics = DeviceTopics(device)
        self.reply_topic = str(console_reply(f"c{uuid.uuid4().hex[:8]}"))
        self.listener = Listener(
            broker, [self.reply_topic, str(self.topics.events), str(self.topics.state)], **kw
        )

    def send(self, name: str, args: dict[str, Any] | None = None, lifetime_s: float = 60) -> bytes:
        """Publish a signed command; return its correlation data."""
        now = time.time()
        body = sign_body(
            {"id": uuid.uuid4().hex, "name": name, "args": args or {}, "issued_at": now,
             "expires_at": now + lifetime_s, "to": self.device},
            self.key,
        )  # fmt: skip
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        self.listener.client.publish(str(self.topics.command(name)), dumps(body), qos=1,
                                     properties=props)  # fmt: skip
        return correlation

    def request(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """Send and wait for the reply: {"id", "ok", "result"|"error", "device_id"}."""
        correlation = self.send(name, args)
        found: list[dict[str, Any]] = []

        def match(listener: Listener) -> bool:
            for topic, body, _, props in listener.messages:
                if topic == self.reply_topic and getattr(props, "CorrelationData", None) == (
                    correlation
                ):
                    found.append(loads(body))
                    return True
            return False

        if not self.listener.wait_for(match, timeout):
            raise AssertionError(f"no reply to {name} {args} within {timeout}s")
        return found[0]

    def deploy(self, args: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        return self.request("deploy", args, timeout)

    def events(self, prefix: str = "update.") -> list[dict[str, Any]]:
        return [e for e in map(loads, self.listener.on("/events")) if e["kind"].startswith(prefix)]

    def kinds(self, prefix: str = "update.") -> list[str]:
        return [e["kind"] for e in self.events(prefix)]

    def wait_event(self, kinds: set[str], timeout: float = 120, after: int = 0) -> dict[str, Any]:
        """The first event of one of `kinds` with seq > `after` (raises on timeout)."""
        found: list[dict[str, Any]] = []

        def match(listener: Listener) -> bool:
            for body in listener.on("/events"):
                event = loads(body)
                if event["kind"] in kinds and event["seq"] > after:
                    found.append(event)
                    return True
            return False

        if not self.listener.wait_for(match, timeout):
            raise AssertionError(f"no event of {sorted(kinds)} in {timeout}s; saw {self.kinds()}")
        return found[0]

    def last_seq(self) -> int:
        events = [loads(b) for b in self.listener.on("/events")]
        return max((e["seq"] for e in events), default=0)

    def state(self) -> dict[str, Any] | None:
        bodies = self.listener.on("/state")
        return loads(bodies[-1]) if bodies else None

    def wait_state(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        def match(listener: Listener) -> bool:
            bodies = listener.on("/state")
            return bool(bodies) and predicate(loads(bodies[-1]))

        if not self.listener.wait_for(match, timeout):
            raise AssertionError(f"retained state never matched; last: {self.state()}")
        state = self.state()
        assert state is not None
        return state

    def close(self) -> None:
        self.listener.close()


def public_pem(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


# ----------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    nonfinite: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # (perf_counter at the answer, model_version, finite) of every answered request
    timeline: list[tuple[float, str, bool]] = field(default_factory=list)

    def first(self, after: float, pred: Callable[[str, bool], bool]) -> float | None:
        """perf_counter of the first answer after `after` for which pred(version, finite)."""
        return next((t for t, v, f in self.timeline if t > after and pred(v, f)), None)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())


class Load:
    """Client threads hammering the agent's Unix socket; every failure counted by code.

    A request that fails in any way (an HTTP error with its `code`, a dropped connection,
    a timeout) counts; answers are checked to be finite (unless `live`, whose rows a bad
    candidate answers with NaN: those are counted in `nonfinite`)."""

    def __init__(self, socket_path: Path, clients: int = 4, live: bool = False,
                 pause_s: float = 0.002) -> None:  # fmt: skip
        self.socket = socket_path
        self.clients = clients
        self.inputs = live_inputs(2) if live else np.asarray(samples()[0][:2], np.float32)
        self.pause_s = pause_s
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadReport:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.report

    def wait_requests(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        start = self.report.ok + self.report.failures
        while self.report.ok + self.report.failures - start < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"load made fewer than {n} requests in {timeout}s")
            time.sleep(0.02)

    def _run(self) -> None:
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                       "shape": list(self.inputs.shape),
                                       "data": self.inputs.reshape(-1).tolist()}]}).encode()  # fmt: skip
        headers = {"content-type": "application/json"}
        client = ApiClient(str(self.socket), timeout=60)
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _, raw = client.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
                data = json.loads(raw)
                if status >= 400:
                    raise ApiError(status, data)
                values = np.asarray(data["outputs"][0]["data"], np.float64)
                finite = bool(values.size) and bool(np.isfinite(values).all())
                t1 = time.perf_counter()
                version = str(data.get("model_version"))
                with self._lock:
                    self.report.ok += 1
                    self.report.versions[version] += 1
                    self.report.latencies_ms.append((t1 - t0) * 1000)
                    self.report.timeline.append((t1, version, finite))
                    if not finite:
                        self.report.nonfinite += 1
            except ApiError as exc:
                with self._lock:
                    self.report.failed[exc.code or f"http.{exc.status}"] += 1
            except (OSError, ValueError, KeyError) as exc:
                with self._lock:
                    self.report.failed[type(exc).__name__] += 1
                client.close()
                client = ApiClient(str(self.socket), timeout=60)
                time.sleep(0.05)
            if self.pause_s:
                time.sleep(self.pause_s)
        client.close()


def served_version(agent: AgentProcess) -> str:
    with agent.client() as api:
        status, _, raw = api.request("GET", f"/v2/models/{MODEL}")
    data = json.loads(raw)
    assert status == 200, data
    versions = data.get("versions") or []
    return str(versions[0]) if versions else str(data.get("version"))


# ----------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    """A broker (mutual TLS + ACL), a bundle server, a console and an agent process."""

    tmp: Path
    broker: Broker
    pki: Pki
    server: BundleServer
    console: Console
    console_key: Ed25519PrivateKey
    agent: AgentProcess | None = None
    config_text: str = ""
    closers: list[Callable[[], None]] = field(default_factory=list)

    def start_agent(
        self, update: str = "", extra: str = "", wait: bool = True, mqtt_port: int | None = None
    ) -> AgentProcess:
        """(Re)start `edge-agent run` on the same state directory (the first call's config
        is kept). `mqtt_port`: reach the broker there instead (a poor link in between)."""
        if not self.config_text:
            self.config_text = agent_config(self.tmp, self.broker, self.pki, self.console_key,
                                            update=update, extra=extra,
                                            mqtt_port=mqtt_port)  # fmt: skip
        config = write_config(self.tmp / "agent.toml", self.config_text)
        self.agent = AgentProcess(config, self.tmp / "api.sock")
        if wait:
            self.agent.wait_ready(120)
            self.wait_link()
        return self.agent

    def wait_link(self, timeout: float = 60) -> None:
        """Until the agent answers a signed ping over MQTT: a command sent before the link
        has subscribed would be lost (no persistent session), not refused."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.console.request("ping", timeout=2)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def kill_agent(self) -> None:
        assert self.agent is not None
        self.agent.proc.kill()
        self.agent.proc.wait()
        self.agent.stop()

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def journal(self) -> dict[str, Any] | None:
        path = self.state_dir / "update.json"
        return json.loads(path.read_text()) if path.exists() else None


def agent_config(
    tmp: Path, broker: Broker, pki: Pki, console_key: Ed25519PrivateKey,
    update: str = "", extra: str = "", bundle: Path | None = None, mqtt_port: int | None = None,
) -> str:  # fmt: skip
    """An agent.toml: the sample served, the link on over mutual TLS, the console's key
    trusted for commands, the bundle server's CA trusted for https downloads."""
    from tests.helpers import SAMPLE_BUNDLE

    cert, key = pki.client(DEVICE)
    console_pub = public_pem(console_key, tmp / "console.pub")
    return "\n".join([
        f'device_id = "{DEVICE}"',
        f'state_dir = "{tmp / "state"}"',
        "[trust]",
        f'public_keys = ["{DEMO_PUB}"]',
        "[api]",
        f'socket = "{tmp / "api.sock"}"',
        "[model]",
        f'bundle = "{bundle or SAMPLE_BUNDLE}"',
        "[mqtt]",
        "enabled = true",
        'host = "localhost"',
        f"port = {mqtt_port or broker.port}",
        "reconnect_min_s = 0.05",
        "reconnect_max_s = 0.5",
        "[mqtt.tls]",
        "enabled = true",
        f'ca_file = "{pki.ca_cert}"',
        f'cert_file = "{cert}"',
        f'key_file = "{key}"',
        "[telemetry]",
        "interval_s = 0.5",
        "[commands]",
        f'console_keys = ["{console_pub}"]',
        "[update]",
        f'ca_file = "{pki.ca_cert}"',
        update,
        extra,
    ]) + "\n"  # fmt: skip


def update_acl() -> str:
    """docs/mqtt.md's device ACL plus the bundle chunk topics of MQTT transfers."""
    return device_acl([CONSOLE]) + (
        "pattern read edgerun/v1/%u/bundle/#\npattern write edgerun/v1/%u/bundle/#\n"
    )


@contextlib.contextmanager
def update_rig(tmp: Path, console_key: Ed25519PrivateKey | None = None) -> Iterator[Rig]:
    """Broker, bundle server (HTTPS) and console; the agent is started by the test."""
    pki = make_pki(tmp / "pki")
    key = console_key or Ed25519PrivateKey.generate()
    broker = Broker(tmp, pki=pki, require_certificate=True, acl=update_acl()).start()
    server = BundleServer(pki)
    cert, ckey = pki.client(CONSOLE)
    console = Console(broker, key, tls=(pki.ca_cert, cert, ckey))
    rig = Rig(tmp, broker, pki, server, console, key)
    try:
        yield rig
    finally:
        if rig.agent is not None:
            rig.agent.stop()
        for close in rig.closers:
            close()
        console.close()
        server.close()
        broker.stop()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def free_disk_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1 << 20)
