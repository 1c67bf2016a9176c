"""The agent's local API against its peers: MLServer and a hand-written FastAPI endpoint.

    python bench/peers.py            (after `make bench-peers`, which makes .venv-peers)

The same models behind each server (the digits ONNX model; a camera-frame model,
uint8 [batch, H, W, 3] -> per-channel mean), the same lean client (pre-encoded KServe
v2 bodies over one keep-alive HTTP/1.1 TCP connection), interleaved rounds (servers
in a new random order every round, so drift hits them alike). Per server: p50/p99 of
the round trip and the server's CPU time per request (its whole process tree, found
by psutil, each thread's /proc schedstat in nanoseconds); ratios against the first
row. Peers are in their own venv: MLServer and FastAPI pull pydantic and a
typing-extensions the main environment cannot take.

Each server runs as it ships: the agent with its defaults (onnxruntime intra-op
spinning off), MLServer and FastAPI with ORT's defaults (spinning on), as their docs'
examples open a session. Spinning pool threads burn CPU that counts in CPU per
request, so a second MLServer runs with the agent's options ("MLServer, agent's ORT
options"), and the bare runs (the model alone, in this process) are shown both ways:
the comparison with options alike is in the same table.

Paths: digits at batch 1, 32 and 256 as JSON and with the binary tensor extension
(MLServer's REST API has no binary extension); frames of 224x224x3 and 1920x1080x3
as JSON, binary, and through Triton's system shared memory (the agent only): once
with the client writing each frame into its /dev/shm region inside the timing (a
client that has the frame elsewhere, like tritonclient's set_shared_memory_region),
and once with the frame already in the region (a camera process that captures into
it: what the API itself costs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from _common import DEMO_KEY, ROOT, SAMPLE, agent_process, build_frame_onnx, pct
from _ort_options import ENV as SPINNING_ENV
from _ort_options import session_options

from export.package import package_model

VENV = ROOT / ".venv-peers"
TOKEN = "peers-bench-token-0123456789"


class LeanClient:
    """One keep-alive TCP connection; bodies are sent as given, replies read whole."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())

    def request(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        more = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{self.extra}{more}\r\n"
        ).encode()
        try:
            self.sock.sendall(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                self.sock.sendall(body)
        except BrokenPipeError:
            pass  # refused before the body was read: the answer says why
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head_end = buf.index(b"\r\n\r\n") + 4
        status = int(buf[9:12])
        length = 0
        for line in buf[:head_end].split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body_out = bytearray(buf[head_end:])
        while len(body_out) < length:
            chunk = self.sock.recv(max(65536, length - len(body_out)))
            if not chunk:
                raise ConnectionError("server closed the connection")
            body_out += chunk
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {bytes(body_out[:300])!r}")
        return bytes(body_out)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Server:
    name: str
    port: int
    pid: int
    headers: dict[str, str] = field(default_factory=dict)
    client: LeanClient | None = None

    def connect(self) -> LeanClient:
        if self.client is None:
            self.client = LeanClient(self.port, self.headers)
        return self.client

    def request(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        """One request; a keep-alive connection the server closed while idle (uvicorn
        closes after 5 s) is opened again once, as any client would."""
        try:
            return self.connect().request(path, body, headers)
        except ConnectionError:
            if self.client is not None:
                self.client.close()
            self.client = None
            return self.connect().request(path, body, headers)

    def tree(self) -> list[psutil.Process]:
        proc = psutil.Process(self.pid)
        return [proc, *proc.children(recursive=True)]

    def cpu(self) -> float:
        """CPU seconds of the process tree: its threads' schedstat (nanoseconds) where
        Linux has it, else psutil's user + system (10 ms ticks: too coarse for a block
        of sub-millisecond requests). A thread that ended takes its time with it; the
        servers' threads (connections, thread pools) live through a case."""
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.Error, OSError, ValueError):
                tasks = Path(f"/proc/{p.pid}/task")
                if tasks.is_dir():
                    for task in tasks.iterdir():
                        with contextlib.suppress(OSError):
                            total += int((task / "schedstat").read_text().split()[0]) / 1e9
                    continue
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_mb(self) -> float:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str = "/v2/health/ready", timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise SystemExit(f"no server answered on port {port}")


@contextlib.contextmanager
def peer(cmd: list[str], port: int, env: dict[str, str], cwd: Path) -> Iterator[int]:
    proc = subprocess.Popen(
        cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_http(port)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


ALIKE = "MLServer, agent's ORT options"


def _mlserver_dir(ml_dir: Path, port: int, models: dict[str, Path]) -> Path:
    if ml_dir.exists():
        shutil.rmtree(ml_dir)
    ml_dir.mkdir()
    (ml_dir / "settings.json").write_text(
        json.dumps(
            {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
             "parallel_workers": 0, "debug": False}
        )
    )  # fmt: skip
    for name, path in models.items():
        (ml_dir / name).mkdir()
        (ml_dir / name / "model-settings.json").write_text(
            json.dumps(
                {"name": name, "implementation": "_peer_mlserver.OnnxModel",
                 "parameters": {"uri": str(path)}}
            )
        )  # fmt: skip
    return ml_dir


@contextlib.contextmanager
def servers(bundle: Path, models: dict[str, Path], tmp: Path) -> Iterator[list[Server]]:
    """The agent (bundle), MLServer and FastAPI (the same ONNX files), all on TCP."""
    python = str(VENV / "bin/python")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    agent_port, ml_port, ml_alike_port, fa_port = free_port(), free_port(), free_port(), free_port()
    ml_dirs = [_mlserver_dir(tmp / "mlserver", ml_port, models),
               _mlserver_dir(tmp / "mlserver-alike", ml_alike_port, models)]  # fmt: skip
    bench = str(Path(__file__).resolve().parent)
    shipped = {"PYTHONPATH": bench, SPINNING_ENV: "1"}  # ORT's defaults
    alike = {"PYTHONPATH": bench, SPINNING_ENV: "0"}  # the agent's default options
    api = (
        f'tcp = "127.0.0.1:{agent_port}"\ntoken = "{token_file}"\n'
        "max_request_mb = 64\nmax_body_inflight_mb = 2048\nmax_shm_mb = 64"
    )
    # The agent's onnxruntime options are its defaults (spinning off).
    agent_extra = "[memory]\nmax_mb = 4096\n"
    mlserver = str(VENV / "bin/mlserver")
    with (
        agent_process(bundle, api=api, extra=agent_extra) as (proc, _, _),
        peer([mlserver, "start", str(ml_dirs[0])], ml_port, shipped, ml_dirs[0]) as ml_pid,
        peer([mlserver, "start", str(ml_dirs[1])], ml_alike_port, alike, ml_dirs[1]) as alike_pid,
        peer([python, f"{bench}/_peer_fastapi.py", str(fa_port)]
             + [f"{n}={p}" for n, p in models.items()], fa_port, shipped, tmp) as fa_pid,
    ):  # fmt: skip
        wait_http(agent_port)
        found = [
            Server("edge-agent", agent_port, proc.pid, {"authorization": f"Bearer {TOKEN}"}),
            Server("MLServer", ml_port, ml_pid),
            Server(ALIKE, ml_alike_port, alike_pid),
            Server("FastAPI", fa_port, fa_pid),
        ]
        try:
            yield found
        finally:
            for s in found:
                if s.client is not None:
                    s.client.close()


def kserve_json(name: str, array: np.ndarray, datatype: str) -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": list(array.shape),
                     "data": array.reshape(-1).tolist()}]}
    ).encode()  # fmt: skip


def kserve_binary(name: str, array: np.ndarray, datatype: str) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": list(array.shape),
                     "parameters": {"binary_data_size": array.nbytes}}],
         "parameters": {"binary_data_output": True}}
    ).encode()  # fmt: skip
    return head + array.tobytes(), {"inference-header-content-length": str(len(head))}


def decode(reply: bytes, headers_binary: bool, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    if headers_binary:  # the output is the last nbytes of the reply
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(reply[-n:], dtype).reshape(shape)
    return np.asarray(json.loads(reply)["outputs"][0]["data"], dtype).reshape(shape)


@dataclass
class Case:
    label: str
    send: dict[str, tuple[Server, Callable[[], bytes]]]  # path label -> (server, one request)
    check: Callable[[str, bytes], None]
    per_round: int
    warm: int = 5


def run_case(case: Case, rounds: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {n: [] for n in case.send}
    cpu: dict[str, float] = dict.fromkeys(case.send, 0.0)
    failed: dict[str, str] = {}
    for name, (_, send) in case.send.items():
        try:
            case.check(name, send())  # warm-up, and every server answers the same
        except (OSError, RuntimeError) as exc:
            failed[name] = str(exc)[:160]
            continue
        for _ in range(case.warm):
            send()
    for name, why in failed.items():
        print(f"  ({name} failed this case and is left out: {why})")
        del case.send[name]
        del times[name], cpu[name]
    for _ in range(rounds):
        order = list(case.send)
        random.shuffle(order)
        for name in order:
            server, send = case.send[name]
            if case.warm:
                send()  # re-warm after the other servers ran
            before = server.cpu()
            for _ in range(case.per_round):
                start = time.perf_counter()
                send()
                times[name].append((time.perf_counter() - start) * 1e6)
            cpu[name] += server.cpu() - before
    return {
        n: {
            "p50": pct(times[n], 50),
            "p99": pct(times[n], 99),
            "cpu": cpu[n] / len(times[n]) * 1e6,
        }
        for n in case.send
    }


def report(label: str, results: dict[str, dict[str, float]]) -> None:
    print(f"\n{label}")
    width = max(28, *(len(name) for name in results))
    print(f"  {'server':{width}} {'p50 us':>10} {'p99 us':>10} {'CPU us/req':>11} "
          f"{'p50 x':>7} {'CPU x':>7}")  # fmt: skip
    base = next(iter(results.values()))
    for name, r in results.items():
        print(
            f"  {name:{width}} {r['p50']:10.0f} {r['p99']:10.0f} {r['cpu']:11.0f} "
            f"{r['p50'] / base['p50']:7.2f} {r['cpu'] / base['cpu']:7.2f}"
        )


def digits_cases(
    found: list[Server], model: Path, batches: list[int], per_round: int
) -> list[Case]:
    import onnxruntime as ort

    shipped = ort.InferenceSession(
        str(model), session_options(spin=True), providers=["CPUExecutionProvider"]
    )
    alike = ort.InferenceSession(
        str(model), session_options(spin=False), providers=["CPUExecutionProvider"]
    )
    here = Server("bench process", 0, os.getpid())
    rng = np.random.default_rng(0)
    by = {s.name: s for s in found}
    cases = []
    path = "/v2/models/digits/infer"
    for batch in batches:
        x = rng.random((batch, 1, 8, 8), dtype=np.float32)
        want = alike.run(None, {"input": x})[0]
        body = kserve_json("input", x, "FP32")
        binary, bin_headers = kserve_binary("input", x, "FP32")

        def check(name: str, reply: bytes, want: np.ndarray = want) -> None:
            if name.startswith("bare"):
                return
            got = decode(reply, name.endswith("binary"), np.float32, want.shape)
            assert np.allclose(got, want, atol=1e-4), name

        n = per_round if batch <= 32 else max(per_round // 4, 10)

        def bare(x: np.ndarray = x, session: ort.InferenceSession = shipped) -> bytes:
            session.run(None, {"input": x})
            return b""

        send_json: dict[str, tuple[Server, Callable[[], bytes]]] = {
            s: (by[s], lambda c=by[s], b=body: c.request(path, b)) for s in by
        }
        # The floor every server pays: the model itself, in this process, both ways.
        send_json["bare onnxruntime, ORT defaults"] = (here, bare)
        send_json["bare onnxruntime, agent's options"] = (
            here,
            lambda x=x: bare(x, alike),
        )
        cases.append(Case(f"digits batch {batch}, JSON", send_json, check, n))
        send_bin: dict[str, tuple[Server, Callable[[], bytes]]] = {
            f"{s} binary": (
                by[s],
                lambda c=by[s], b=binary, h=bin_headers: c.request(path, b, h),
            )
            for s in ("edge-agent", "FastAPI")
        }
        cases.append(Case(f"digits batch {batch}, binary extension", send_bin, check, n))
    return cases


def frame_cases(found: list[Server], sizes: list[tuple[int, int]], model: Path) -> list[Case]:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(model), session_options(spin=False), providers=["CPUExecutionProvider"]
    )
    here = Server("bench process", 0, os.getpid())
    by = {s.name: s for s in found}
    rng = np.random.default_rng(1)
    cases = []
    path = "/v2/models/frame/infer"
    agent = by["edge-agent"]
    for height, width in sizes:
        frame = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
        want = frame[:, ::4, ::4].reshape(-1, 3).astype(np.float64).mean(0).reshape(1, 3)
        big = height * width > 500_000

        def check(name: str, reply: bytes, want: np.ndarray = want) -> None:
            if name.startswith("bare"):
                return
            got = decode(reply, name.endswith("binary"), np.float32, (1, 3))
            assert np.allclose(got, want, rtol=1e-4), (name, got, want)

        body = kserve_json("image", frame, "UINT8")
        binary, bin_headers = kserve_binary("image", frame, "UINT8")
        # Shared memory: the client's region, registered once; each request writes the
        # new frame into it (the camera's own copy) and names the region.
        key = f"/er-peers-{os.getpid()}-{height}"
        shm_path = Path("/dev/shm") / key[1:]
        with shm_path.open("wb") as f:
            f.truncate(frame.nbytes)
        fd = os.open(shm_path, os.O_RDWR)
        region = mmap.mmap(fd, frame.nbytes)
        os.close(fd)
        view = np.frombuffer(region, np.uint8).reshape(frame.shape)
        name = f"frame{height}"
        agent.request(
            f"/v2/systemsharedmemory/region/{name}/register",
            json.dumps({"key": key, "offset": 0, "byte_size": frame.nbytes}).encode(),
        )
        shm_body = json.dumps(
            {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(frame.shape),
                         "parameters": {"shared_memory_region": name,
                                        "shared_memory_byte_size": frame.nbytes}}]}
        ).encode()  # fmt: skip

        def via_shm(b: bytes = shm_body, v: np.ndarray = view, f: np.ndarray = frame) -> bytes:
            np.copyto(v, f)
            return agent.request(path, b)

        np.copyto(view, frame)

        def in_region(b: bytes = shm_body) -> bytes:
            return agent.request(path, b)  # the camera wrote the frame into the region

        label = f"frame {height}x{width}x3 uint8"

        def over(server: Server, b: bytes, h: dict[str, str] | None = None) -> Callable[[], bytes]:
            return lambda: server.request(path, b, h)

        def bare(f: np.ndarray = frame) -> bytes:
            session.run(None, {"image": f})
            return b""

        send = {
            "edge-agent shared memory, frame in region": (agent, in_region),
            "edge-agent shared memory, client copies": (agent, via_shm),
            "bare onnxruntime (no server)": (here, bare),
            "edge-agent binary": (agent, over(agent, binary, bin_headers)),
            "FastAPI binary": (by["FastAPI"], over(by["FastAPI"], binary, bin_headers)),
        }
        cases.append(Case(f"{label}: shared memory vs binary", send, check, 20 if big else 100))
        send_json = {
            "edge-agent": (agent, over(agent, body)),
            "edge-agent shared memory, client copies": (agent, via_shm),
            "MLServer": (by["MLServer"], over(by["MLServer"], body)),
            "FastAPI": (by["FastAPI"], over(by["FastAPI"], body)),
        }
        cases.append(
            Case(f"{label}: JSON", send_json, check, 1 if big else 10, warm=0 if big else 2)
        )
        shm_path.unlink()  # the mapping stays until the agent unregisters it
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--skip-frames", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    if not (VENV / "bin/python").exists():
        raise SystemExit(f"{VENV} is missing: run `make bench-peers` first")
    load = os.getloadavg()
    print(
        f"peers: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        "onnxruntime intra-op spinning: agent off (its default), MLServer and FastAPI on "
        f"(ORT's default), {ALIKE!r} off"
    )
    with tempfile.TemporaryDirectory(prefix="er-peers-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        digits = tmp / "digits.onnx"
        with tarfile.open(SAMPLE) as bundle:
            member = bundle.extractfile("model.onnx")
            assert member is not None
            digits.write_bytes(member.read())
        rss: dict[str, dict[str, float]] = {}
        if not args.skip_digits:
            with servers(SAMPLE, {"digits": digits}, tmp) as found:
                for case in digits_cases(found, digits, args.batches, args.per_round):
                    report(case.label, run_case(case, args.rounds))
                rss["digits"] = {s.name: s.rss_mb() for s in found}
        if not args.skip_frames:
            frame_onnx = build_frame_onnx(tmp / "frame.onnx", "h", "w")
            x = np.random.default_rng(2).integers(0, 256, (1, 1080, 1920, 3), dtype=np.uint8)
            frame_bundle = package_model(
                onnx_path=frame_onnx, tflite_path=None, name="frame", version="1.0.0",
                golden_inputs={"image": x}, key_path=DEMO_KEY,
                out_dir=tmp, runs=5,
            )  # fmt: skip
            with servers(frame_bundle, {"frame": frame_onnx}, tmp) as found:
                for case in frame_cases(found, [(224, 224), (1080, 1920)], frame_onnx):
                    report(case.label, run_case(case, max(args.rounds // 2, 3)))
                rss["frames"] = {s.name: s.rss_mb() for s in found}
    print("\nRSS after the runs (MB, whole process tree):")
    for phase, values in rss.items():
        print(f"  {phase}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
