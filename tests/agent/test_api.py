"""The local API over a real agent process: Open Inference Protocol, errors, metrics."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.api.client import ApiClient, ApiError
from tests.helpers import AgentProcess, base_config, samples, write_config


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="er-api-", dir="/tmp"))
    config = write_config(
        tmp / "agent.toml",
        base_config(tmp, api='tcp = "127.0.0.1:0"\nmax_request_mb = 1\nmax_batch_size = 64'),
    )
    proc = AgentProcess(config, tmp / "api.sock")
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[ApiClient]:
    with agent.client() as c:
        yield c


def raw(agent: AgentProcess, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(agent.socket))
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_health_and_server_metadata(client: ApiClient) -> None:
    assert client.get_json("/v2/health/live") == {"live": True}
    assert client.get_json("/v2/health/ready") == {"ready": True}
    meta = client.get_json("/v2")
    assert meta["name"] == "edgerun" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata(client: ApiClient) -> None:
    meta = client.get_json("/v2/models/digits")
    assert meta["name"] == "digits" and meta["versions"] == ["1.0.0"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["labels"] == [str(i) for i in range(10)]
    assert client.get_json("/v2/models/digits/versions/1.0.0/ready")["ready"] is True


@pytest.mark.parametrize("binary", [False, True])
def test_infer_answers_the_right_digits(client: ApiClient, binary: bool) -> None:
    images, labels = samples()
    out = client.infer("digits", {"input": images}, binary=binary, request_id="r-1")
    assert out["logits"].shape == (len(labels), 10)
    assert (out["logits"].argmax(1) == labels).mean() >= 0.9


def test_infer_json_response_shape_and_output_selection(client: ApiClient) -> None:
    images, _ = samples()
    body = {
        "id": "abc",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 1, 8, 8],
                "data": images[0].reshape(-1).tolist(),
            }
        ],
        "outputs": [{"name": "logits"}],
    }
    status, _, data = client.request(
        "POST", "/v2/models/digits/versions/1.0.0/infer", json.dumps(body).encode()
    )
    assert status == 200
    resp = json.loads(data)
    assert (
        resp["id"] == "abc" and resp["model_name"] == "digits" and resp["model_version"] == "1.0.0"
    )
    assert resp["outputs"][0]["name"] == "logits" and resp["outputs"][0]["shape"] == [1, 10]
    body["outputs"] = [{"name": "probabilities"}]
    status, _, data = client.request("POST", "/v2/models/digits/infer", json.dumps(body).encode())
    assert (
        status == 400
        and "requested output 'probabilities' does not exist" in json.loads(data)["error"]
    )


def test_mixed_binary_output_request(client: ApiClient) -> None:
    images, _ = samples()
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [2, 1, 8, 8],
                "data": images[:2].reshape(-1).tolist(),
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    status, headers, data = client.request(
        "POST", "/v2/models/digits/infer", json.dumps(body).encode()
    )
    assert status == 200
    hlen = int(headers["inference-header-content-length"])
    head = json.loads(data[:hlen])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    assert len(data) - hlen == 80


def post(
    client: ApiClient, body: object, path: str = "/v2/models/digits/infer"
) -> tuple[int, dict[str, object]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, resp = client.request("POST", path, data)
    return status, json.loads(resp)


def tensor(
    shape: list[int], datatype: str = "FP32", name: str = "input", data: object = None
) -> dict[str, object]:
    n = int(np.prod(shape))
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "data": data if data is not None else [0.0] * n,
    }


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (b"{not json", 400, "request.malformed", "not valid JSON"),
        (b"[1, 2]", 400, "request.malformed", "must be a JSON object"),
        ({"inputs": []}, 400, "request.malformed", "non-empty list"),
        (
            {"inputs": [tensor([1, 64])]},
            400,
            "input.mismatch",
            "input 'input': expected shape [-1, 1, 8, 8] (-1 = any), got [1, 64]",
        ),
        (
            {"inputs": [tensor([1, 1, 8, 8], "FP64")]},
            400,
            "input.mismatch",
            "expected dtype float32, got float64",
        ),
        (
            {"inputs": [tensor([1, 1, 8, 8], name="pixels")]},
            400,
            "input.mismatch",
            "unknown input 'pixels'",
        ),
        ({"inputs": [tensor([1, 1, 8, 8], "FP128")]}, 400, "request.malformed", "datatype 'FP128'"),
        (
            {"inputs": [tensor([1, 1, 8, 8], data=[1.0, 2.0])]},
            400,
            "request.malformed",
            "2 values do not fill shape [1, 1, 8, 8]",
        ),
        (
            {"inputs": [tensor([1, 1, 8, 8], data=["a"] * 64)]},
            400,
            "request.malformed",
            "data is not FP32",
        ),
        ({"inputs": [tensor([-1, 1, 8, 8])]}, 400, "request.malformed", "non-negative integers"),
        (
            {"inputs": [tensor([65, 1, 8, 8], data=[0] * (65 * 64))]},
            413,
            "request.too_large",
            "batch size 65 is above the limit of 64",
        ),
    ],
)
def test_bad_requests_get_a_4xx_with_a_json_error(
    client: ApiClient, body: object, status: int, code: str, message: str
) -> None:
    got_status, resp = post(client, body)
    assert (got_status, resp["code"]) == (status, code), resp
    assert message in str(resp["error"])


def test_wrong_model_version_endpoint_and_method(client: ApiClient) -> None:
    status, resp = post(client, {"inputs": [tensor([1, 1, 8, 8])]}, "/v2/models/cats/infer")
    assert status == 404 and "model 'cats' is not served here" in str(resp["error"])
    status, resp = post(
        client, {"inputs": [tensor([1, 1, 8, 8])]}, "/v2/models/digits/versions/9/infer"
    )
    assert status == 404 and "version '9'" in str(resp["error"])
    status, _, data = client.request("GET", "/v2/models/digits/infer")
    assert status == 405
    status, _, data = client.request("GET", "/v3/anything")
    assert status == 404 and json.loads(data)["code"] == "endpoint.not_found"


def test_oversized_body_is_refused_before_it_is_read(agent: AgentProcess) -> None:
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 5000000\r\n\r\n"
    reply = raw(agent, head)
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"above the limit of 1048576 (api.max_request_mb = 1)" in reply


def test_garbage_and_chunked_requests(agent: AgentProcess) -> None:
    assert raw(agent, b"HELLO\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(agent, b"GET /v2 HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    chunked = (
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert raw(agent, chunked).startswith(b"HTTP/1.1 411")
    assert raw(agent, b"GET /v2 HTTP/1.1\r\nhost: x\r\ncontent-length: -4\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    assert raw(
        agent, b"GET /v2 HTTP/1.1\r\nhost: x\r\n" + b"x: " + b"a" * 70000 + b"\r\n\r\n"
    ).startswith(b"HTTP/1.1 431")


def test_binary_extension_errors(client: ApiClient) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1, 8, 8],
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    status, _, data = client.request(
        "POST",
        "/v2/models/digits/infer",
        head + b"\0" * 100,
        {"inference-header-content-length": str(len(head))},
    )
    assert (
        status == 400
        and "binary_data_size 256 is not a byte count within the 100" in json.loads(data)["error"]
    )
    status, _, data = client.request(
        "POST",
        "/v2/models/digits/infer",
        head + b"\0" * 256,
        {"inference-header-content-length": "99999"},
    )
    assert status == 400 and "outside the body" in json.loads(data)["error"]


def test_agent_survives_everything_and_counts_it(agent: AgentProcess, client: ApiClient) -> None:
    assert agent.proc.poll() is None
    images, labels = samples()
    out = client.infer("digits", {"input": images})
    assert (out["logits"].argmax(1) == labels).mean() >= 0.9
    text = client.metrics()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(lines["edgerun_inference_requests_total"]) >= 3
    assert int(lines['edgerun_inference_errors_total{code="input.mismatch"}']) >= 3
    assert int(lines['edgerun_inference_errors_total{code="request.malformed"}']) >= 3
    assert int(lines['edgerun_inference_latency_seconds_bucket{le="+Inf"}']) == int(
        lines["edgerun_inference_latency_seconds_count"]
    )
    assert int(lines["edgerun_process_resident_memory_bytes"]) > 10 * 1024 * 1024
    info = next(k for k in lines if k.startswith("edgerun_model_info"))
    assert 'name="digits"' in info and 'version="1.0.0"' in info and 'runtime="onnxruntime"' in info


def test_tcp_listener_serves_the_same_api(agent: AgentProcess, client: ApiClient) -> None:
    tcp = next(a for a in client.get_json("/v2/edgerun/status")["api"] if a.startswith("tcp:"))
    assert tcp.startswith("tcp:127.0.0.1:")
    with ApiClient(tcp) as c:
        images, labels = samples()
        out = c.infer("digits", {"input": images[:3]})
        assert list(out["logits"].argmax(1)) == list(labels[:3])


def test_status_reports_model_memory_and_runtimes(client: ApiClient) -> None:
    status = client.get_json("/v2/edgerun/status")
    assert status["ready"] is True and status["model"]["name"] == "digits"
    assert status["model"]["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert status["runtimes"] == {"onnxruntime": "available", "litert": "available"}
    assert status["memory"]["cap_mb"] > 0 and status["memory"]["rss_mb"] > 0


def test_error_on_bad_requests_does_not_break_keep_alive(client: ApiClient) -> None:
    for _ in range(3):
        status, _ = post(client, b"{bad")
        assert status == 400
    images, _ = samples()
    assert client.infer("digits", {"input": images[:1]})["logits"].shape == (1, 10)


def test_api_error_type_carries_code(client: ApiClient) -> None:
    with pytest.raises(ApiError) as info:
        client.infer("digits", {"input": np.zeros((1, 64), np.float32)})
    assert info.value.status == 400 and info.value.code == "input.mismatch"


def test_connection_limit_and_idle_timeout(tmp: Path) -> None:
    from tests.helpers import running_agent

    config = base_config(
        tmp,
        api="max_connections = 2\nidle_timeout_s = 1.0\nhead_timeout_s = 60\nbody_timeout_s = 60",
    )
    with running_agent(tmp, config) as agent:
        busy = []
        try:
            # Mid-request, not idle: these are not evicted. Mid-body rather than mid-head:
            # a head still arriving after a second may be displaced by a client that sends
            # its whole head at once (408), and on a loaded box this test can take that long.
            for _ in range(2):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(agent.socket))
                s.sendall(
                    b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\n"
                    b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
                )
                busy.append(s)
            with agent.client() as c:
                # Only once both slots are taken does the third get refused.
                for _ in range(200):
                    status, _, body = c.request("GET", "/v2/health/live")
                    if status == 503:
                        break
                    c.close()
            assert status == 503, body
            assert b"too many connections (api.max_connections = 2)" in body
            reply = raw(agent, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 503") and b"\r\nretry-after: 1\r\n" in reply
        finally:
            for s in busy:
                s.close()
        # An idle keep-alive connection is closed by the agent after idle_timeout_s.
        # The agent frees the two busy slots when it reads their EOF, which may come a
        # moment after our close(): until then a new connection is still refused (503).
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(agent.socket))
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            first = s.recv(65536)
            if not first.startswith(b"HTTP/1.1 503"):
                break
            s.close()
            time.sleep(0.05)
        with s:
            assert first.startswith(b"HTTP/1.1 200"), first
            assert s.recv(65536) == b""  # closed by the server, not by our timeout
        with agent.client() as c:
            assert c.get_json("/v2/health/ready") == {"ready": True}


# ------------------------------------------------------------------ HTTP conformance


def test_head_answers_headers_without_a_body(agent: AgentProcess) -> None:
    reply = raw(agent, b"HEAD /v2 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    get = raw(agent, b"GET /v2 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    length = next(h for h in get.split(b"\r\n") if h.startswith(b"content-length"))
    assert length in head.split(b"\r\n")  # the length the GET body has


def test_wrong_method_gets_405_with_allow(agent: AgentProcess) -> None:
    reply = raw(agent, b"DELETE /v2 HTTP/1.1\r\nhost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405") and b"\r\nallow: GET, HEAD\r\n" in reply
    reply = raw(agent, b"GET /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405") and b"\r\nallow: POST\r\n" in reply


def test_expect_100_continue_is_answered_before_the_body(agent: AgentProcess) -> None:
    images, _ = samples()
    body = json.dumps(
        {"inputs": [tensor([1, 1, 8, 8], data=images[0].reshape(-1).tolist())]}
    ).encode()
    head = (
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(agent.socket))
        s.sendall(head)
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"  # sent before any body byte
        s.sendall(body)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    # Refused without the body: the final answer comes at once, no 100.
    reply = raw(
        agent,
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
        b"content-length: 90000000\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 413")


def test_non_finite_outputs_are_valid_json_strings(client: ApiClient) -> None:
    # Binary inputs pass NaN through (a sensor may send it); the JSON answer stays JSON.
    images, _ = samples()
    x = images[:2].copy()
    x[0, 0, 0, 0] = np.nan
    x[1] = np.inf
    # JSON inputs must be finite (JSON has no NaN); the client refuses to write them.
    with pytest.raises(ValueError, match="not JSON compliant"):
        client.infer("digits", {"input": x}, binary=False)
    status, _, body = client.request(
        "POST",
        "/v2/models/digits/infer",
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"data":[NaN]}]}',
    )
    assert status == 400 and b"contains NaN, which is not valid JSON" in body
    raw_head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    status, _, body = client.request(
        "POST",
        "/v2/models/digits/infer",
        raw_head + x.tobytes(),
        {"inference-header-content-length": str(len(raw_head))},
    )
    assert status == 200
    decoded = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    data = decoded["outputs"][0]["data"]
    assert "NaN" in data and all(isinstance(v, (float, str)) for v in data)
    assert np.isnan(np.asarray(data, dtype=np.float32)).any()


def test_statistics_endpoints(client: ApiClient) -> None:
    images, _ = samples()
    client.infer("digits", {"input": images[:4]})
    every = client.get_json("/v2/models/stats")
    one = client.get_json("/v2/models/digits/stats")
    versioned = client.get_json("/v2/models/digits/versions/1.0.0/stats")
    for answer in (every, one, versioned):
        (entry,) = answer["model_stats"]
        assert entry["name"] == "digits" and entry["version"] == "1.0.0"
        assert entry["inference_count"] >= 4
        assert entry["inference_stats"]["success"]["count"] >= 1
        assert entry["inference_stats"]["success"]["ns"] > 0
    with pytest.raises(ApiError) as info:
        client.get_json("/v2/models/cats/stats")
    assert info.value.code == "model.not_found"


def test_unsupported_encoding_and_type_get_415(client: ApiClient) -> None:
    import gzip

    body = gzip.compress(json.dumps({"inputs": [tensor([1, 1, 8, 8])]}).encode())
    status, _, data = client.request(
        "POST", "/v2/models/digits/infer", body, {"content-encoding": "gzip"}
    )
    assert status == 415 and json.loads(data)["code"] == "request.media_type"
    client.close()


def test_slow_head_is_cut_off_and_others_are_served(tmp: Path) -> None:
    from tests.helpers import running_agent

    config = base_config(tmp, api="max_connections = 4\nhead_timeout_s = 1.0")
    with running_agent(tmp, config) as agent:
        slow = []
        for _ in range(4):  # every slot held by a client that never finishes its head
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            s.connect(str(agent.socket))
            s.sendall(b"GET /v2 HTTP/1.1\r\nx-a: 1\r\n")
            slow.append(s)
        try:
            for s in slow:
                reply = s.recv(65536)
                assert reply.startswith(b"HTTP/1.1 408"), reply
                assert b"api.head_timeout_s" in reply
            with agent.client() as c:  # the slots are free again
                assert c.get_json("/v2/health/ready") == {"ready": True}
        finally:
            for s in slow:
                s.close()


def test_idle_connections_make_room_at_the_limit(tmp: Path) -> None:
    from tests.helpers import running_agent

    config = base_config(tmp, api="max_connections = 2")
    with running_agent(tmp, config) as agent:
        first, second = agent.client(), agent.client()
        try:
            assert first.get_json("/v2/health/live") == {"live": True}
            assert second.get_json("/v2/health/live") == {"live": True}
            # Both become idle keep-alive connections once the agent has written their
            # replies; one idle for a second is evicted for a newcomer. On a loaded box the
            # agent marks them idle a moment after we read the reply, so a newcomer that
            # arrives too early is still refused (503): try again, a bounded number of times.
            time.sleep(1.2)
            for _ in range(50):
                with agent.client() as third:
                    status, _, body = third.request("GET", "/v2/health/ready")
                if status != 503:
                    break
                time.sleep(0.1)
            assert status == 200 and json.loads(body) == {"ready": True}, body
            # The evicted client reconnects by itself on its next request.
            assert first.get_json("/v2/health/live") == {"live": True}
            assert second.get_json("/v2/health/live") == {"live": True}
        finally:
            first.close()
            second.close()


# ------------------------------------------------------------------ who may call


def _token_agent(tmp: Path, tcp: str, token: str | None) -> tuple[Path, str]:
    api = f'tcp = "{tcp}"'
    if token is not None:
        (tmp / "creds").mkdir(exist_ok=True)
        (tmp / "creds" / "api-token").write_text(token + "\n")
        api += '\ntoken = "credential:api-token"'
    return write_config(tmp / "agent.toml", base_config(tmp, api=api)), str(tmp / "creds")


def test_non_loopback_tcp_without_token_refuses_to_start(tmp: Path) -> None:
    import subprocess
    import sys

    config, _ = _token_agent(tmp, "0.0.0.0:0", None)
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert (
        "cannot start [config.invalid]: api.token: api.tcp = '0.0.0.0:0' listens beyond loopback"
        in out.stderr
    )
    assert "api.token" in out.stderr and "Traceback" not in out.stderr
    config, creds = _token_agent(tmp, "0.0.0.0:0", "short")
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**__import__("os").environ, "CREDENTIALS_DIRECTORY": creds},
    )
    assert out.returncode == 1 and "holds 5 bytes; use at least 16" in out.stderr, out.stderr


def test_token_guards_tcp_but_not_health_or_the_socket(tmp: Path) -> None:
    import os

    token = "t0ken-" + "9" * 30
    config, creds = _token_agent(tmp, "0.0.0.0:0", token)
    agent = AgentProcess(config, tmp / "api.sock", {"CREDENTIALS_DIRECTORY": creds})
    try:
        agent.wait_ready()
        with agent.client() as c:  # the Unix socket: its mode and group decide
            port = next(a for a in c.get_json("/v2/edgerun/status")["api"] if "tcp" in a)
        address = "127.0.0.1:" + port.rsplit(":", 1)[1]
        with ApiClient(address) as anon:
            assert anon.get_json("/v2/health/ready") == {"ready": True}
            status, headers, data = anon.request("GET", "/v2/edgerun/status")
            assert status == 401 and headers["www-authenticate"].startswith("Bearer")
            assert json.loads(data)["code"] == "auth.required"
        with ApiClient(address, token="x" * len(token)) as wrong:
            status, _, data = wrong.request("GET", "/metrics")
            assert status == 401 and json.loads(data)["code"] == "auth.invalid"
        with ApiClient(address, token=token) as good:
            images, labels = samples()
            out = good.infer("digits", {"input": images[:3]})
            assert list(out["logits"].argmax(1)) == list(labels[:3])
        assert oct(os.stat(tmp / "api.sock").st_mode & 0o777) == "0o660"
    finally:
        agent.stop()


def test_socket_mode_and_group_are_applied(tmp: Path) -> None:
    import grp
    import os

    from tests.helpers import running_agent

    group = grp.getgrgid(os.getgid()).gr_name
    config = base_config(tmp, api=f'socket_mode = "0600"\nsocket_group = "{group}"')
    with running_agent(tmp, config) as agent:
        st = os.stat(agent.socket)
        assert st.st_mode & 0o777 == 0o600 and st.st_gid == os.getgid()
    bad = base_config(tmp, api='socket_group = "no-such-group-x"')
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(write_config(tmp / "b.toml", bad)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1
    assert (
        "cannot start [start.failed]: api.socket_group = 'no-such-group-x' is not a group"
        in out.stderr
    )


# ------------------------------------------------------------------ edge-agent infer / status


def test_cli_infer_reports_the_413_and_what_to_do(agent: AgentProcess, tmp: Path) -> None:
    import subprocess
    import sys

    images, _ = samples()
    big = np.repeat(images[:1], 20000, axis=0)  # ~5 MB as JSON, over max_request_mb = 1
    np.save(tmp / "big.npy", big)
    command = ["infer", "--socket", str(agent.socket), "--input", str(tmp / "big.npy")]
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1
    assert "above the limit of 1048576 (api.max_request_mb = 1)" in out.stderr, out.stderr
    assert "[request.too_large]" in out.stderr and "try --binary" in out.stderr
    assert "Broken pipe" not in out.stderr and "Traceback" not in out.stderr


def test_cli_status_into_a_closed_pipe_exits_quietly(agent: AgentProcess) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        f"{sys.executable} -m agent.cli status --socket {agent.socket} | head -c 1 >/dev/null;"
        " echo rc=${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.stderr == "", out.stderr
    assert out.stdout.strip() == "rc=0"


# ------------------------------------------------------------------ watchdog gating


def _watchdog_scenario(tmp: Path, monkeypatch: pytest.MonkeyPatch, breaks: str) -> list[str]:
    """Run a real Agent in this process under a systemd-style watchdog, break one part
    (`watcher` or `api`) once it pets, and return what was sent to NOTIFY_SOCKET."""
    import asyncio
    import time

    from agent.config.loader import load_config
    from agent.service import Agent

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pet every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = load_config(write_config(tmp / "agent.toml", base_config(tmp)), environ={})
    agent = Agent(config)
    seen: list[str] = []
    after: list[str] = []

    def drain(into: list[str]) -> None:
        while True:
            try:
                into.append(notify.recv(4096).decode())
            except BlockingIOError:
                return

    async def collect(into: list[str], seconds: float) -> None:
        # Drain often: a full datagram queue would block the agent's sd_notify send.
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            drain(into)
            await asyncio.sleep(0.05)
        drain(into)

    async def scenario() -> None:
        try:
            deadline = time.monotonic() + 30  # hang guard
            while sum("WATCHDOG=1" in m for m in seen) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                drain(seen)
            if breaks == "watcher":
                await asyncio.get_running_loop().run_in_executor(None, agent.watcher.stop)
            else:
                for listener in agent.api._listeners:
                    listener.close()
            await collect(seen, 0.5)  # a pet already on its way before the break
            await collect(after, 1.5)
        finally:
            agent.request_stop()

    async def on_ready() -> None:
        tasks.append(asyncio.create_task(scenario()))

    tasks: list[asyncio.Task[None]] = []
    try:
        asyncio.run(agent.run(on_ready))
    finally:
        notify.close()
    assert sum("WATCHDOG=1" in m for m in seen) >= 2, seen  # it petted while healthy
    return after


def test_watchdog_is_not_petted_once_the_rss_watcher_stops(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after = _watchdog_scenario(tmp, monkeypatch, "watcher")
    assert not [m for m in after if "WATCHDOG=1" in m], after


def test_watchdog_is_not_petted_once_the_api_stops_accepting(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after = _watchdog_scenario(tmp, monkeypatch, "api")
    assert not [m for m in after if "WATCHDOG=1" in m], after


# ------------------------------------------------------------------ body admission


def test_bodies_in_flight_are_admitted_against_a_budget_before_reading(tmp: Path) -> None:
    import time

    from tests.helpers import running_agent

    config = base_config(tmp, api="max_request_mb = 8\nmax_body_inflight_mb = 6")
    size = int(4.9 * 1024 * 1024)
    head = (
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % size
    )
    with running_agent(tmp, config) as agent:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.settimeout(20)
            first.connect(str(agent.socket))
            first.sendall(head + b" " * 1000)  # admitted: its body is on its way
            reply = b""
            for _ in range(200):  # until the first head is admitted (it was sent first)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(0.5)
                    probe.connect(str(agent.socket))
                    probe.sendall(head)
                    try:
                        reply = probe.recv(65536)
                    except TimeoutError:
                        continue  # this one was admitted first; it goes away unread
                if reply.startswith(b"HTTP/1.1 503"):
                    break
            assert reply.startswith(b"HTTP/1.1 503"), reply
            assert b"\r\nretry-after: 1\r\n" in reply
            assert b"request body of 4.90 MB does not fit now: 4.90 MB of request bodies" in reply
            assert b"(api.max_body_inflight_mb)" in reply
            with agent.client() as c:  # small requests are still served meanwhile
                assert c.get_json("/v2/health/ready") == {"ready": True}
        # The first client went away: its reservation is released.
        with agent.client() as c:
            images, _ = samples()
            assert c.infer("digits", {"input": images[:2]})["logits"].shape == (2, 10)
            for _ in range(200):  # released once the agent has seen the first one go
                status, _, body = c.request("POST", "/v2/models/digits/infer", b" " * size)
                if status != 503:
                    break
                time.sleep(0.05)
            assert status == 400, body  # admitted and read this time (then not JSON)


def test_client_reads_the_refusal_when_tcp_send_is_cut(
    agent: AgentProcess, client: ApiClient
) -> None:
    tcp = next(a for a in client.get_json("/v2/edgerun/status")["api"] if a.startswith("tcp:"))
    with ApiClient(tcp) as c:
        status, _, body = c.request("POST", "/v2/models/digits/infer", b"x" * (30 << 20))
    assert status == 413 and json.loads(body)["code"] == "request.too_large"


def test_a_taken_tcp_port_is_a_clear_startup_error(agent: AgentProcess, tmp: Path) -> None:
    import subprocess
    import sys

    with agent.client() as c:
        taken = next(a for a in c.get_json("/v2/edgerun/status")["api"] if a.startswith("tcp:"))
    address = taken.removeprefix("tcp:")
    config = write_config(tmp / "agent.toml", base_config(tmp, api=f'tcp = "{address}"'))
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    # The start-up checks (agent/preflight.py, as check-config) see the port taken.
    assert f"cannot start [start.failed]: api.tcp: {address} is in use by another process" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr


def test_http_1_0_keep_alive_is_honoured(agent: AgentProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(agent.socket))
        for _ in range(2):
            s.sendall(b"GET /v2/health/live HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200") and b"\r\nconnection: keep-alive\r\n" in reply
        s.sendall(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        assert b"\r\nconnection: close\r\n" in s.recv(65536)
        assert s.recv(65536) == b""


def test_thread_start_failure_is_a_503_and_the_api_keeps_accepting(tmp: Path) -> None:
    """When no thread can start (TasksMax=, pids.max, memory), a connection gets a 503
    and the accept loop goes on. Made real here by asking for thread stacks of 1 TiB,
    which the kernel cannot map, in a real Agent in this process."""
    import asyncio
    import threading

    from agent.config.loader import load_config
    from agent.service import Agent

    config = load_config(write_config(tmp / "agent.toml", base_config(tmp)), environ={})
    agent = Agent(config)
    replies: list[bytes] = []

    def ask() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(tmp / "api.sock"))
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    async def on_ready() -> None:
        previous = threading.stack_size(1 << 40)
        try:
            replies.append(ask())  # blocking on purpose: no executor thread can start now
        finally:
            threading.stack_size(previous)
        # The API answers before the start-up bundle is in: wait for the model (hang guard).
        deadline = time.monotonic() + 60
        replies.append(ask())
        while not replies[-1].startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            replies[-1] = ask()
        agent.request_stop()

    asyncio.run(agent.run(on_ready))
    assert replies[0].startswith(b"HTTP/1.1 503"), replies
    assert b"out of file descriptors or threads" in replies[0]
    assert replies[1].startswith(b"HTTP/1.1 200"), replies


def test_api_config_keys_are_validated_with_their_path() -> None:
    from agent.config.loader import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "api": {
                    "socket_mode": "rw-rw----",
                    "socket_group": "bad group",
                    "token": "s3cret-inline",  # the secret itself, not a reference
                    "head_timeout_s": 0,
                    "max_body_inflight_mb": 0,
                }
            },
            environ={},
        )
    found = {issue.path: issue.message for issue in info.value.issues}
    assert "does not match" in found["api.socket_mode"]
    assert "does not match" in found["api.socket_group"]
    assert "does not match" in found["api.token"]
    assert "below the minimum" in found["api.head_timeout_s"]
    assert "below the minimum" in found["api.max_body_inflight_mb"]


def test_slow_heads_make_room_for_a_client_that_sends_its_head_at_once(tmp: Path) -> None:
    """Issue 7: connections dripping a header line every few seconds locked everyone
    out. At the connection limit, the head that has been arriving longest gives way."""
    from tests.helpers import running_agent

    config = base_config(tmp, api="max_connections = 3\nhead_timeout_s = 60")
    with running_agent(tmp, config) as agent:
        slow = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(30)
                s.connect(str(agent.socket))
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")  # and never the rest
                slow.append(s)
            time.sleep(1.5)  # older than the slow-head threshold (1 s)
            for _ in range(3):
                request = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                reply = raw(agent, request)
                assert reply.startswith(b"HTTP/1.1 200"), reply
            # The first good client displaced the oldest slow head, which was told why;
            # the next ones found the slot it freed (the good clients closed theirs).
            answers = []
            for s in slow:
                s.settimeout(2)
                try:
                    answers.append(s.recv(65536))
                except TimeoutError:
                    answers.append(b"")
            told = [a for a in answers if a]
            assert len(told) == 1, answers
            assert told[0].startswith(b"HTTP/1.1 408"), told
            assert b"request.timeout" in told[0] and b"api.max_connections" in told[0]
            assert answers[0] == told[0]  # the oldest
        finally:
            for s in slow:
                s.close()
