"""A small keep-alive HTTP client for the local API (Unix socket or TCP).

Used by `edge-agent infer/status`, the tests and the benchmarks; it speaks just
enough HTTP/1.1 for the agent's server, so the round trip measures the agent.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import numpy as np

from agent.api.kserve import DATATYPES, TO_DATATYPE


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.code = str(body.get("code", ""))
        super().__init__(f"HTTP {status}: {body.get('error', body)}")


class ApiClient:
    def __init__(self, address: str, timeout: float = 30.0, token: str | None = None) -> None:
        """`address` is "unix:/path", a socket path, or "host:port"; `token` is sent as
        `Authorization: Bearer` (api.token)."""
        self.address = address
        self.timeout = timeout
        self._auth = f"authorization: Bearer {token}\r\n" if token else ""
        self._sock: socket.socket | None = None
        self._buf = b""
        self._heads: dict[tuple[Any, ...], bytes] = {}

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        addr = self.address
        if addr.startswith(("unix:", "/", ".")) or ":" not in addr:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(addr.removeprefix("unix:"))
        else:
            host, _, port = addr.removeprefix("tcp:").rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buf = b""
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        head = [f"{method} {path} HTTP/1.1", "host: edgerun", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        payload = ("\r\n".join(head) + "\r\n" + self._auth + "\r\n").encode() + body
        # A server may close an idle keep-alive connection: _exchange reconnects once.
        return self._exchange(payload)

    def _read_until(self, sock: socket.socket, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise _ClosedError("connection closed")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read_exact(self, sock: socket.socket, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise _ClosedError("connection closed")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _read_response(self, sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
        head = self._read_until(sock, b"\r\n\r\n").decode("latin-1").split("\r\n")
        while head[0].startswith("HTTP/1.1 1"):  # 100 Continue: the final answer follows
            head = self._read_until(sock, b"\r\n\r\n").decode("latin-1").split("\r\n")
        parts = head[0].split(" ")
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {head[0][:80]!r}")
        status = int(parts[1])
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        body = self._read_exact(sock, int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def get_json(self, path: str) -> dict[str, Any]:
        status, _, body = self.request("GET", path)
        data = json.loads(body) if body else {}
        if status >= 400:
            raise ApiError(status, data)
        result: dict[str, Any] = data
        return result

    def metrics(self) -> str:
        _, _, body = self.request("GET", "/metrics")
        return body.decode()

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        binary: bool = False,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Send one request; binary=True uses the binary tensor extension both ways."""
        if binary and request_id is None:
            return self._infer_binary(model, inputs)
        tensors = []
        blobs = []
        for name, array in inputs.items():
            entry: dict[str, Any] = {
                "name": name,
                "datatype": TO_DATATYPE[array.dtype.name],
                "shape": list(array.shape),
            }
            if binary:
                raw = np.ascontiguousarray(array).tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = array.reshape(-1).tolist()
            tensors.append(entry)
        req: dict[str, Any] = {"inputs": tensors}
        if request_id is not None:
            req["id"] = request_id
        headers = {"content-type": "application/json"}
        if binary:
            req["parameters"] = {"binary_data_output": True}
        head = json.dumps(req, separators=(",", ":"), allow_nan=False).encode()
        if binary:
            headers["inference-header-content-length"] = str(len(head))
        status, resp_headers, body = self.request(
            "POST", f"/v2/models/{model}/infer", head + b"".join(blobs), headers
        )
        return decode_response(status, resp_headers, body)

    def _infer_binary(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Repeated requests of one shape (the common case on a device) reuse their
        # request head: only the tensor bytes change.
        key = (model, tuple((n, a.dtype.str, a.shape) for n, a in inputs.items()))
        prefix = self._heads.get(key)
        if prefix is None:
            tensors = [
                {
                    "name": name,
                    "datatype": TO_DATATYPE[array.dtype.name],
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes},
                }
                for name, array in inputs.items()
            ]
            head = json.dumps(
                {"inputs": tensors, "parameters": {"binary_data_output": True}},
                separators=(",", ":"),
                allow_nan=False,
            ).encode()
            size = len(head) + sum(a.nbytes for a in inputs.values())
            prefix = (
                f"POST /v2/models/{model}/infer HTTP/1.1\r\nhost: edgerun\r\n"
                f"content-length: {size}\r\ncontent-type: application/json\r\n"
                f"inference-header-content-length: {len(head)}\r\n{self._auth}\r\n"
            ).encode() + head
            if len(self._heads) > 64:
                self._heads.clear()
            self._heads[key] = prefix
        payload = prefix + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
        return decode_response(*self._exchange(payload))

    def _exchange(self, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            reused = self._sock is not None
            sock = self._connect()
            try:
                sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The server may have refused the request (413, 401, 503) and closed
                # before taking the whole body: its answer is still there to read.
                answer = self._answer_after_cut(sock)
                if answer is not None:
                    return answer
                self.close()
                if attempt or not reused:
                    raise ConnectionError(f"the agent closed the connection: {exc}") from exc
                continue
            try:
                return self._read_response(sock)
            except (ConnectionResetError, _ClosedError):
                self.close()
                if attempt or not reused:  # only a stale keep-alive connection is retried
                    raise
        raise AssertionError("unreachable")

    def _answer_after_cut(self, sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
        try:
            return self._read_response(sock)
        except (OSError, ValueError, IndexError):
            return None


def decode_response(status: int, headers: dict[str, str], body: bytes) -> dict[str, np.ndarray]:
    hlen = headers.get("inference-header-content-length")
    head = body[: int(hlen)] if hlen else body
    data = json.loads(head)
    if status >= 400:
        raise ApiError(status, data)
    binary = body[int(hlen) :] if hlen else b""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in data["outputs"]:
        dtype = np.dtype(DATATYPES[tensor["datatype"]])
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(binary, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            offset += size
        else:
            arr = np.asarray(tensor["data"], dtype=dtype)
        out[tensor["name"]] = arr.reshape(tensor["shape"])
    return out


class _ClosedError(ConnectionError):
    pass
