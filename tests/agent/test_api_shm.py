"""Triton's system shared-memory extension against a real agent process.

tritonclient's own helpers (tritonclient.utils.shared_memory, tritonclient.http) over
TCP with a token, and raw requests over the Unix socket for every refusal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.api.client import ApiClient
from tests.helpers import AgentProcess, base_config, samples, write_config

SHM = Path("/dev/shm")
MakeShm = Callable[..., tuple[str, Path]]
TOKEN = "shm-test-token-" + "7" * 20


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    tmp = Path(tempfile.mkdtemp(prefix="er-shm-", dir="/tmp"))
    (tmp / "creds").mkdir()
    (tmp / "creds" / "api-token").write_text(TOKEN + "\n")
    api = (
        'tcp = "127.0.0.1:0"\ntoken = "credential:api-token"\nsocket_mode = "0666"\n'
        "max_shm_regions = 6\nmax_shm_mb = 64\nmax_batch_size = 64"
    )
    config = write_config(
        tmp / "agent.toml", base_config(tmp, api=api, extra="[memory]\nmax_mb = 1024\n")
    )
    proc = AgentProcess(config, tmp / "api.sock", {"CREDENTIALS_DIRECTORY": str(tmp / "creds")})
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[ApiClient]:
    with agent.client() as c:
        yield c
        c.request("POST", "/v2/systemsharedmemory/unregister")  # each test starts clean


@pytest.fixture
def shm_file() -> Iterator[MakeShm]:
    made: list[Path] = []

    def make(size: int, data: bytes = b"") -> tuple[str, Path]:
        key = f"/er-test-{uuid.uuid4().hex[:12]}"
        path = SHM / key[1:]
        with path.open("wb") as f:
            f.truncate(size)
            f.write(data)
        made.append(path)
        return key, path

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def tcp_address(client: ApiClient) -> str:
    tcp = next(a for a in client.get_json("/v2/edgerun/status")["api"] if a.startswith("tcp:"))
    return "127.0.0.1:" + tcp.rsplit(":", 1)[1]


def post(client: ApiClient, path: str, body: object = None) -> tuple[int, dict[str, object]]:
    data = b"" if body is None else json.dumps(body).encode()
    status, _, resp = client.request("POST", path, data)
    return status, json.loads(resp) if resp else {}


def register(
    client: ApiClient, name: str, key: str, size: int, offset: int = 0
) -> tuple[int, dict[str, object]]:
    return post(
        client,
        f"/v2/systemsharedmemory/region/{name}/register",
        {"key": key, "offset": offset, "byte_size": size},
    )


def shm_input(region: str, size: int, shape: list[int], offset: int = 0) -> dict[str, object]:
    params: dict[str, object] = {"shared_memory_region": region, "shared_memory_byte_size": size}
    if offset:
        params["shared_memory_offset"] = offset
    return {"name": "input", "datatype": "FP32", "shape": shape, "parameters": params}


def test_tritonclient_passes_tensors_through_shared_memory(
    agent: AgentProcess, client: ApiClient
) -> None:
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    images, labels = samples()
    images = np.ascontiguousarray(images[:8])
    expected = client.infer("digits", {"input": images}, binary=True)["logits"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    triton = httpclient.InferenceServerClient(tcp_address(client))
    key_in, key_out = f"/er-tc-in-{os.getpid()}", f"/er-tc-out-{os.getpid()}"
    in_handle = shm.create_shared_memory_region("frames", key_in, images.nbytes)
    out_handle = shm.create_shared_memory_region("logits", key_out, 8 * 10 * 4 + 64)
    try:
        shm.set_shared_memory_region(in_handle, [images])
        triton.register_system_shared_memory("frames", key_in, images.nbytes, headers=auth)
        triton.register_system_shared_memory("logits", key_out, 8 * 10 * 4 + 64, headers=auth)
        status = triton.get_system_shared_memory_status(headers=auth)
        assert sorted((r["name"], r["key"], r["byte_size"]) for r in status) == [
            ("frames", key_in, images.nbytes),
            ("logits", key_out, 8 * 10 * 4 + 64),
        ]
        assert triton.get_system_shared_memory_status("frames", headers=auth) == [
            {"name": "frames", "key": key_in, "offset": 0, "byte_size": images.nbytes}
        ]
        inp = httpclient.InferInput("input", list(images.shape), "FP32")
        inp.set_shared_memory("frames", images.nbytes)
        out = httpclient.InferRequestedOutput("logits", binary_data=False)
        out.set_shared_memory("logits", 320, offset=64)
        result = triton.infer("digits", [inp], outputs=[out], headers=auth)
        entry = result.get_output("logits")
        assert entry["shape"] == [8, 10] and "data" not in entry
        assert entry["parameters"] == {
            "shared_memory_region": "logits",
            "shared_memory_byte_size": 320,
            "shared_memory_offset": 64,
        }
        got = shm.get_contents_as_numpy(out_handle, np.float32, [8, 10], offset=64)
        assert np.array_equal(got, expected)
        assert (got.argmax(1) == labels[:8]).mean() >= 0.85
        # A new frame in the same region: the agent reads what is there now.
        shm.set_shared_memory_region(in_handle, [np.ascontiguousarray(images[::-1])])
        triton.infer("digits", [inp], outputs=[out], headers=auth)
        again = shm.get_contents_as_numpy(out_handle, np.float32, [8, 10], offset=64)
        assert np.array_equal(again, expected[::-1])
        # JSON output next to a shared-memory input.
        plain = triton.infer("digits", [inp], headers=auth)
        assert np.array_equal(plain.as_numpy("logits"), expected[::-1])
        triton.unregister_system_shared_memory("logits", headers=auth)
        assert [r["name"] for r in triton.get_system_shared_memory_status(headers=auth)] == [
            "frames"
        ]
        triton.unregister_system_shared_memory(headers=auth)
        assert triton.get_system_shared_memory_status(headers=auth) == []
        meta = triton.get_server_metadata(headers=auth)
        assert "system_shared_memory" in meta["extensions"]
    finally:
        triton.close()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def test_unix_socket_round_trip_with_offsets(client: ApiClient, shm_file: MakeShm) -> None:
    images, _ = samples()
    x = np.ascontiguousarray(images[:4])
    key, path = shm_file(4096 + x.nbytes + 4096)
    with path.open("r+b") as f:
        f.seek(4096 + 128)
        f.write(x.tobytes())
    assert register(client, "io", key, 8192, offset=1024) == (200, {})
    body = {
        "inputs": [shm_input("io", x.nbytes, [4, 1, 8, 8], offset=3072 + 128)],
        "outputs": [
            {
                "name": "logits",
                "parameters": {
                    "shared_memory_region": "io",
                    "shared_memory_byte_size": 160,
                    "shared_memory_offset": 8,
                },
            }
        ],
    }
    status, resp = post(client, "/v2/models/digits/infer", body)
    assert status == 200, resp
    assert resp["outputs"] == [  # type: ignore[comparison-overlap]
        {
            "name": "logits",
            "datatype": "FP32",
            "shape": [4, 10],
            "parameters": {
                "shared_memory_region": "io",
                "shared_memory_byte_size": 160,
                "shared_memory_offset": 8,
            },
        }
    ]
    raw = path.read_bytes()
    expected = client.infer("digits", {"input": x}, binary=True)["logits"]
    got = np.frombuffer(raw[1024 + 8 : 1024 + 8 + 160], np.float32).reshape(4, 10)
    assert np.array_equal(got, expected)
    # Nothing around the output span was touched.
    assert raw[: 1024 + 8] == bytes(1024 + 8)
    assert raw[1024 + 168 : 4096 + 128] == bytes(4096 + 128 - 1024 - 168)


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ({"key": "../etc/passwd", "byte_size": 8}, 400, "shm.invalid", "never a path"),
        ({"key": "/a/b", "byte_size": 8}, 400, "shm.invalid", "never a path"),
        ({"key": "/..", "byte_size": 8}, 400, "shm.invalid", "never a path"),
        ({"key": 5, "byte_size": 8}, 400, "shm.invalid", "not a shared-memory object name"),
        ({"key": "/er-test-missing-object", "byte_size": 8}, 404, "shm.not_found", "create it"),
        ({"key": "KEY", "byte_size": 0}, 400, "shm.invalid", "at least 1"),
        ({"key": "KEY", "byte_size": -1}, 400, "shm.invalid", "byte_size must be"),
        ({"key": "KEY", "byte_size": True}, 400, "shm.invalid", "byte_size must be"),
        ({"key": "KEY", "byte_size": 8, "offset": "0"}, 400, "shm.invalid", "offset must be"),
        ({"key": "KEY", "byte_size": 4097}, 400, "shm.invalid", "beyond the end"),
        ({"key": "KEY", "byte_size": 8, "offset": 4090}, 400, "shm.invalid", "beyond the end"),
        ({"key": "KEY", "byte_size": 65 * 2**20}, 413, "shm.limit", "api.max_shm_mb"),
        ([1, 2], 400, "shm.invalid", "JSON object"),
    ],
)
def test_register_refusals(
    client: ApiClient, shm_file: MakeShm, body: object, status: int, code: str, message: str
) -> None:
    key, _ = shm_file(4096)
    if isinstance(body, dict) and body.get("key") == "KEY":
        body = {**body, "key": key}
    got_status, resp = post(client, "/v2/systemsharedmemory/region/r1/register", body)
    assert (got_status, resp["code"]) == (status, code), resp
    assert message in str(resp["error"])
    assert client.get_json("/v2/health/ready") == {"ready": True}
    status_, _, data = client.request("GET", "/v2/systemsharedmemory/status")
    assert status_ == 200 and json.loads(data) == []


def test_names_symlinks_directories_and_duplicates(client: ApiClient, shm_file: MakeShm) -> None:
    key, path = shm_file(4096)
    status, resp = register(client, "bad%20name", key, 8)
    assert status == 400 and resp["code"] == "shm.invalid" and "region name" in str(resp["error"])
    link = SHM / f"er-test-link-{os.getpid()}"
    target = Path(tempfile.mkdtemp(prefix="er-shm-", dir="/tmp")) / "secret"
    target.write_bytes(b"x" * 4096)
    folder = SHM / f"er-test-dir-{os.getpid()}"
    try:
        link.symlink_to(target)
        status, resp = register(client, "r", "/" + link.name, 8)
        assert status == 400 and resp["code"] == "shm.invalid", resp
        folder.mkdir()
        status, resp = register(client, "r", "/" + folder.name, 8)
        assert status == 400 and resp["code"] == "shm.invalid", resp
    finally:
        link.unlink(missing_ok=True)
        folder.rmdir() if folder.exists() else None
    assert register(client, "r", key, 8) == (200, {})
    status, resp = register(client, "r", key, 8)
    assert status == 409 and resp["code"] == "shm.exists"
    status, _, data = client.request("GET", "/v2/systemsharedmemory/region/nope/status")
    assert status == 404 and json.loads(data)["code"] == "shm.not_found"
    # Unregistering an unknown region is not an error (Triton's semantics).
    assert post(client, "/v2/systemsharedmemory/region/nope/unregister") == (200, {})
    assert post(client, "/v2/systemsharedmemory/region/r/unregister") == (200, {})
    assert post(client, "/v2/systemsharedmemory/region/r/register", None)[0] == 400
    status, _, _ = client.request("GET", "/v2/systemsharedmemory/region/r/register")
    assert status == 405


def test_region_count_and_byte_caps(client: ApiClient, shm_file: MakeShm) -> None:
    key, _ = shm_file(4096)
    for i in range(6):
        assert register(client, f"r{i}", key, 4096) == (200, {})
    status, resp = register(client, "r6", key, 4096)
    assert status == 413 and resp["code"] == "shm.limit" and "api.max_shm_regions" in str(resp)
    post(client, "/v2/systemsharedmemory/unregister")
    # Sparse objects (nothing allocated until touched): the bytes cap counts the sizes.
    big, _ = shm_file(60 * 2**20)
    for i in range(6):
        status, resp = register(client, f"b{i}", big, 60 * 2**20)
        if status != 200:
            break
    assert status == 413 and resp["code"] == "shm.limit"  # max_shm_mb (64) first
    post(client, "/v2/systemsharedmemory/unregister")


def test_memory_headroom_refuses_a_region_with_503(shm_file: MakeShm) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="er-shm-mem-", dir="/tmp"))
    config = write_config(
        tmp / "agent.toml",
        base_config(tmp, api="max_shm_mb = 4096", extra="[memory]\nmax_mb = 400\n"),
    )
    proc = AgentProcess(config, tmp / "api.sock")
    try:
        proc.wait_ready()
        key, _ = shm_file(380 * 2**20)  # sparse: nothing allocated
        with proc.client() as c:
            status, resp = register(c, "huge", key, 380 * 2**20)
            assert status == 503 and resp["code"] == "overloaded", resp
            assert "under the soft limit" in str(resp["error"])
            assert register(c, "small", key, 2**20) == (200, {})
            images, _ = samples()
            assert c.infer("digits", {"input": images[:2]})["logits"].shape == (2, 10)
    finally:
        assert proc.stop() == 0, proc.output()


def test_infer_refusals_keep_the_model_serving(client: ApiClient, shm_file: MakeShm) -> None:
    images, _ = samples()
    x = np.ascontiguousarray(images[:2])
    key, path = shm_file(4096, x.tobytes())
    assert register(client, "in", key, 4096) == (200, {})
    url = "/v2/models/digits/infer"
    cases: list[tuple[dict[str, object], int, str, str]] = [
        ({"inputs": [shm_input("nope", x.nbytes, [2, 1, 8, 8])]}, 404, "shm.not_found", "nope"),
        ({"inputs": [shm_input("in", 100, [2, 1, 8, 8])]}, 400, "shm.invalid", "does not hold"),
        ({"inputs": [shm_input("in", x.nbytes, [2, 1, 8, 8], 4000)]}, 400, "shm.invalid", "fit"),
        (
            {"inputs": [{**shm_input("in", x.nbytes, [2, 1, 8, 8]), "data": [1.0]}]},
            400,
            "request.malformed",
            "also carries data",
        ),
        (
            {
                "inputs": [shm_input("in", x.nbytes, [2, 1, 8, 8])],
                "outputs": [
                    {
                        "name": "logits",
                        "parameters": {
                            "shared_memory_region": "in",
                            "shared_memory_byte_size": 16,
                        },
                    }
                ],
            },
            400,
            "shm.invalid",
            "offers 16",
        ),
        (
            {
                "inputs": [shm_input("in", x.nbytes, [2, 1, 8, 8])],
                "outputs": [
                    {
                        "name": "logits",
                        "parameters": {"shared_memory_region": 3, "shared_memory_byte_size": 80},
                    }
                ],
            },
            400,
            "shm.invalid",
            "must be a string",
        ),
    ]
    for body, status, code, message in cases:
        got, resp = post(client, url, body)
        assert (got, resp["code"]) == (status, code), (body, resp)
        assert message in str(resp["error"]), resp
    # The client shrinks its object: a clear refusal, not a SIGBUS.
    os.truncate(path, 100)
    got, resp = post(client, url, {"inputs": [shm_input("in", x.nbytes, [2, 1, 8, 8])]})
    assert got == 400 and resp["code"] == "shm.invalid" and "shrank" in str(resp["error"])
    # Unregistered: gone for infer too.
    post(client, "/v2/systemsharedmemory/region/in/unregister")
    got, resp = post(client, url, {"inputs": [shm_input("in", x.nbytes, [2, 1, 8, 8])]})
    assert got == 404 and resp["code"] == "shm.not_found"
    assert client.infer("digits", {"input": x})["logits"].shape == (2, 10)
    metrics = client.metrics()
    assert 'code="shm.not_found"' in metrics and 'code="shm.invalid"' in metrics


def test_tcp_needs_the_token_and_the_agents_own_objects(
    client: ApiClient, shm_file: MakeShm
) -> None:
    address = tcp_address(client)
    key, path = shm_file(4096)
    with ApiClient(address) as anon:
        status, _, data = anon.request(
            "POST",
            "/v2/systemsharedmemory/region/r/register",
            json.dumps({"key": key, "byte_size": 8}).encode(),
        )
        assert status == 401 and json.loads(data)["code"] == "auth.required"
    with ApiClient(address, token=TOKEN) as good:
        assert register(good, "mine", key, 8) == (200, {})
        os.chown(path, 12345, 12345)  # another user's object
        status, resp = register(good, "theirs", key, 8)
        assert status == 403 and resp["code"] == "shm.forbidden" and "uid 12345" in str(resp)


def test_tcp_without_a_token_has_no_shared_memory(shm_file: MakeShm) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="er-shm-tcp-", dir="/tmp"))
    config = write_config(tmp / "agent.toml", base_config(tmp, api='tcp = "127.0.0.1:0"'))
    proc = AgentProcess(config, tmp / "api.sock")
    try:
        proc.wait_ready()
        images, _ = samples()
        x = np.ascontiguousarray(images[:1])
        key, _ = shm_file(4096, x.tobytes())
        with proc.client() as local:
            address = tcp_address(local)
            assert register(local, "in", key, x.nbytes) == (200, {})  # the socket may
        with ApiClient(address) as c:
            status, resp = register(c, "r", key, 8)
            assert status == 403 and resp["code"] == "shm.forbidden" and "api.token" in str(resp)
            # Nor may it use a region the socket registered, or list them.
            status, resp = post(
                c, "/v2/models/digits/infer", {"inputs": [shm_input("in", x.nbytes, [1, 1, 8, 8])]}
            )
            assert status == 403 and resp["code"] == "shm.forbidden"
            status, _, _ = c.request("GET", "/v2/systemsharedmemory/status")
            assert status == 403
            assert c.infer("digits", {"input": x})["logits"].shape == (1, 10)
    finally:
        assert proc.stop() == 0, proc.output()


_AS_NOBODY = """
import json, os, sys
from agent.api.client import ApiClient
sock, root_key = sys.argv[1], sys.argv[2]
# Drop to nobody before connecting: SO_PEERCRED records who connected.
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
mine = "/dev/shm/er-test-nobody-%d" % os.getpid()
with open(mine, "wb") as f:
    f.truncate(4096)
out = {}
try:
    with ApiClient(sock) as c:
        for name, key in (("root", root_key), ("mine", "/" + os.path.basename(mine))):
            status, _, data = c.request(
                "POST", f"/v2/systemsharedmemory/region/{name}/register",
                json.dumps({"key": key, "byte_size": 8}).encode())
            out[name] = [status, json.loads(data).get("code") if data else None]
finally:
    os.unlink(mine)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_a_socket_user_may_register_only_its_own_objects(
    agent: AgentProcess, client: ApiClient, shm_file: MakeShm
) -> None:
    key, _ = shm_file(4096)  # owned by root, the agent's user
    root = Path(__file__).resolve().parents[2]
    os.chmod(agent.socket.parent, 0o755)  # nobody must reach the socket (mode 0666)
    out = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, str(agent.socket), key],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    result = json.loads(out.stdout)
    assert result == {"root": [403, "shm.forbidden"], "mine": [200, None]}, out.stderr
