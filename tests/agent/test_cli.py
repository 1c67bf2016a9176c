"""edge-agent's command line and process behaviour: verify, infer, status, signals, systemd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.api.client import ApiClient
from tests.helpers import (
    DEMO_PUB,
    SAMPLE_BUNDLE,
    AgentProcess,
    SampleParts,
    base_config,
    make_bundle,
    running_agent,
    samples,
    write_config,
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_for_output(agent: AgentProcess, text: str, timeout: float = 60) -> None:
    """Hang guard only: returns as soon as the agent has logged `text`."""
    deadline = time.monotonic() + timeout
    while text not in agent.output():
        assert agent.proc.poll() is None, agent.output()
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{agent.output()}"
        time.sleep(0.05)


def test_verify_ok_and_refusals(
    sample_parts: SampleParts, other_key: Ed25519PrivateKey, tmp: Path
) -> None:
    ok = cli("verify", str(SAMPLE_BUNDLE), "--key", str(DEMO_PUB))
    assert ok.returncode == 0, ok.stderr
    assert (
        "OK" in ok.stdout
        and "version 1.0.0" in ok.stdout
        and "input  input float32 [-1, 1, 8, 8]" in ok.stdout
    )
    foreign = make_bundle(sample_parts, tmp / "f.edgebundle", other_key)
    bad = cli("verify", str(foreign), "--key", str(DEMO_PUB))
    assert bad.returncode == 1
    assert "REFUSED [bundle.untrusted_signer]" in bad.stdout
    cut = tmp / "cut.edgebundle"
    cut.write_bytes(SAMPLE_BUNDLE.read_bytes()[:5000])
    bad = cli("verify", str(cut), "--key", str(DEMO_PUB))
    assert bad.returncode == 1 and "REFUSED [bundle.format]" in bad.stdout
    nokey = cli("verify", str(SAMPLE_BUNDLE))
    assert nokey.returncode == 2 and "no public key" in nokey.stderr


def test_verify_with_config_keys(tmp: Path) -> None:
    config = write_config(tmp / "agent.toml", base_config(tmp))
    out = cli("verify", str(SAMPLE_BUNDLE), "--config", str(config))
    assert out.returncode == 0 and "OK" in out.stdout


def test_infer_and_status_commands(tmp: Path) -> None:
    images, labels = samples()
    np.save(tmp / "x.npy", images[:4])
    (tmp / "x.json").write_text(json.dumps(images[:2].tolist()))
    with running_agent(tmp, base_config(tmp)) as agent:
        for args in ([], ["--binary"]):
            out = cli("infer", "--socket", str(agent.socket), "--input", str(tmp / "x.npy"), *args)
            assert out.returncode == 0, out.stderr
            result = json.loads(out.stdout)
            assert result["top1"] == [str(x) for x in labels[:4]]
        out = cli("infer", "--socket", str(agent.socket), "--input", str(tmp / "x.json"))
        assert json.loads(out.stdout)["top1"] == [str(x) for x in labels[:2]]
        np.save(tmp / "bad.npy", np.zeros((2, 64), np.float32))
        out = cli("infer", "--socket", str(agent.socket), "--input", str(tmp / "bad.npy"))
        assert out.returncode == 1 and "expected shape [-1, 1, 8, 8]" in out.stderr
        out = cli("status", "--socket", str(agent.socket))
        assert out.returncode == 0
        status = json.loads(out.stdout)
        assert status["model"]["version"] == "1.0.0" and status["device_id"] == "test-device"
        # A relative socket path is a path, not host:port.
        rel = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--socket", "api.sock"],
            capture_output=True,
            text=True,
            cwd=tmp,
            check=False,
        )
        assert rel.returncode == 0, rel.stderr
    out = cli("status", "--socket", str(tmp / "api.sock"))
    assert out.returncode == 1 and "cannot reach the agent" in out.stderr


def test_start_without_a_usable_bundle_fails_clearly(
    sample_parts: SampleParts, other_key: Ed25519PrivateKey, tmp: Path
) -> None:
    foreign = make_bundle(sample_parts, tmp / "f.edgebundle", other_key)
    config = write_config(tmp / "agent.toml", base_config(tmp, bundle=foreign))
    out = cli("run", "--config", str(config))
    # Nothing in `current` and no MQTT link that could bring another bundle: exit 1.
    assert out.returncode == 1
    assert "cannot start [bundle.untrusted_signer]: cannot serve" in out.stderr
    assert "not signed by a trusted key" in out.stderr
    config.write_text('[memory]\nmax_mb = "x"\n')
    out = cli("run", "--config", str(config))
    assert out.returncode == 1, out.stderr
    assert "cannot start [config.invalid]:" in out.stderr
    assert "memory.max_mb: expected an integer" in out.stderr
    assert "Traceback" not in out.stderr


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp: Path) -> None:
    # Micro-batching with a long wait keeps a request in flight while SIGTERM arrives.
    config = base_config(
        tmp, extra="[batching]\nenabled = true\nmax_batch = 64\nmax_wait_ms = 1000\n"
    )
    images, labels = samples()
    with running_agent(tmp, config) as agent:
        result: dict[str, object] = {}

        def request() -> None:
            with ApiClient(str(agent.socket)) as c:
                result["out"] = c.infer("digits", {"input": images})

        t = threading.Thread(target=request)
        t.start()
        # SIGTERM once the agent holds the request (it waits in the batcher for up to
        # 1 s), seen on /metrics rather than guessed with a sleep.
        with ApiClient(str(agent.socket)) as probe:
            for _ in range(500):
                _, _, text = probe.request("GET", "/metrics")
                if b"edgerun_inflight_requests 1" in text:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the request never reached the agent")
        agent.proc.send_signal(signal.SIGTERM)
        t.join(timeout=30)
        code = agent.wait_exit(30)
    assert code == 0, agent.output()
    out = result["out"]
    assert isinstance(out, dict) and (out["logits"].argmax(1) == labels).mean() >= 0.9
    assert "stopped" in agent.output()
    assert not agent.socket.exists(), "socket left behind"


def test_micro_batching_merges_concurrent_requests(tmp: Path) -> None:
    config = base_config(
        tmp, extra="[batching]\nenabled = true\nmax_batch = 32\nmax_wait_ms = 30\n"
    )
    images, labels = samples()
    with running_agent(tmp, config) as agent:
        answers: dict[int, int] = {}

        def request(i: int) -> None:
            with ApiClient(str(agent.socket)) as c:
                answers[i] = int(c.infer("digits", {"input": images[i : i + 1]})["logits"].argmax())

        threads = [threading.Thread(target=request, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with agent.client() as c:
            metrics = c.metrics()
    assert [answers[i] for i in range(len(images))] == list(labels)
    buckets = {
        line.split("le=")[1].split("}")[0].strip('"'): int(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("edgerun_inference_batch_size_bucket")
    }
    assert buckets["+Inf"] == len(images)  # one request per image
    lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    assert int(lines["edgerun_inference_requests_total"]) == len(images)
    # Requests shared runtime calls: fewer calls than requests, all rows accounted for.
    calls = int(lines["edgerun_runtime_batch_size_count"])
    assert calls < len(images), metrics
    assert float(lines["edgerun_runtime_batch_size_sum"]) == len(images)


def test_systemd_notify_ready_watchdog_and_stopping(tmp: Path) -> None:
    sock_path = tmp / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(30)
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    agent = AgentProcess(write_config(tmp / "agent.toml", base_config(tmp)), tmp / "api.sock", env)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 2:
            messages.append(server.recv(4096).decode())
        agent.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in "".join(messages):
            messages.append(server.recv(4096).decode())
        assert agent.wait_exit(30) == 0
    finally:
        agent.stop()
        server.close()
    ready = next(m for m in messages if "READY=1" in m)
    # READY=1 comes with the API up, before model.bundle is checked (the state dir
    # is fresh: nothing was served yet); a STATUS update follows the install.
    assert f"MAINPID={agent.proc.pid}" in ready
    assert "STATUS=serving no model; checking" in ready and str(SAMPLE_BUNDLE) in ready
    after = messages[messages.index(ready) :]
    assert any("STATUS=serving digits 1.0.0" in m for m in after), messages
    assert sum("WATCHDOG=1" in m for m in messages) >= 2
    assert messages.index(ready) < next(i for i, m in enumerate(messages) if "WATCHDOG=1" in m)


def test_newer_bundle_in_config_is_installed_on_restart(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    with running_agent(tmp, base_config(tmp)) as agent, agent.client() as c:
        assert c.get_json("/v2/models/digits")["versions"] == ["1.0.0"]
    v2 = make_bundle(sample_parts, tmp / "d-1.1.0.edgebundle", demo_key, version="1.1.0")
    with running_agent(tmp, base_config(tmp, bundle=v2)) as agent:
        # 1.0.0 (current) serves at once; 1.1.0 takes over once it has been checked.
        wait_for_output(agent, "event model.swapped")
        with agent.client() as c:
            assert c.get_json("/v2/models/digits")["versions"] == ["1.1.0"]
    # Pointing back at the older file does not downgrade: it is refused and 1.1.0 keeps serving.
    with running_agent(tmp, base_config(tmp, bundle=SAMPLE_BUNDLE)) as agent:
        wait_for_output(agent, "not newer than the running 1.1.0")
        with agent.client() as c:
            assert c.get_json("/v2/models/digits")["versions"] == ["1.1.0"]


# ------------------------------------------------------------ start-up (issue 7, section 5)


def run_fails(config: Path, env: dict[str, str] | None = None) -> str:
    """`edge-agent run` on `config` must exit 1 with one `cannot start` line, no traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 1, out.stderr
    assert "cannot start [" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out.stderr


def test_nan_is_refused_at_start_from_toml_and_from_the_environment(tmp: Path) -> None:
    config = write_config(
        tmp / "agent.toml", base_config(tmp, extra="[memory]\nsoft_limit_fraction = nan\n")
    )
    err = run_fails(config)
    assert "[config.invalid]" in err
    assert "memory.soft_limit_fraction: nan is not a finite number (allowed: 0.1 to 1)" in err
    config = write_config(tmp / "agent.toml", base_config(tmp))
    err = run_fails(
        config, {"EDGERUN_API__IDLE_TIMEOUT_S": "nan", "EDGERUN_TELEMETRY__INTERVAL_S": "inf"}
    )
    assert "api.idle_timeout_s: nan is not a finite number" in err
    assert "telemetry.interval_s: inf is not a finite number" in err
    assert not (tmp / "state").exists(), "a refused config touched the state dir"


def test_api_addresses_check_config_refuses_are_refused_by_run_too(tmp: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    long_dir = tmp / ("d" * 100)
    cases = {
        'tcp = "127.0.0.1:99999"': "api.tcp: port 99999 is out of range (allowed: 1 to 65535",
        'tcp = "no-such-host.invalid:8080"': "api.tcp: host 'no-such-host.invalid' does not resolve",
        f'tcp = "127.0.0.1:{port}"': f"api.tcp: 127.0.0.1:{port} is in use by another process",
        "socket": "a Unix socket path may have at most 107",
    }
    try:
        for api, message in cases.items():
            text = base_config(tmp, api=api if api != "socket" else "")
            if api == "socket":
                text = text.replace(str(tmp / "api.sock"), str(long_dir / "api.sock"))
            config = write_config(tmp / "agent.toml", text)
            check = cli("check-config", str(config))
            assert check.returncode == 1 and message in check.stdout, (api, check.stdout)
            err = run_fails(config)
            assert message in err, (api, err)
    finally:
        busy.close()


def test_deep_toml_and_odd_config_files_are_refused_by_both_commands(tmp: Path) -> None:
    deep = tmp / "deep.toml"
    deep.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    fifo = tmp / "fifo.toml"
    os.mkfifo(fifo)
    binary = tmp / "bin.toml"
    binary.write_bytes(b'device_id = "\xff\xfe"\n')
    for path, code, message in (
        (deep, "config.syntax", "nested more than 16 levels deep"),
        (fifo, "config.unreadable", "is a FIFO (named pipe), not a regular file"),
        (binary, "config.unreadable", "not UTF-8 text (byte 13 is 0xff)"),
        (Path("/dev/zero"), "config.unreadable", "is a character device"),
    ):
        check = cli("check-config", str(path))
        assert check.returncode == 1 and f"[{code}]" in check.stdout, check.stdout
        assert message in check.stdout and "Traceback" not in check.stdout + check.stderr
        err = run_fails(path)
        assert f"cannot start [{code}]" in err and message in err


def populate_current(tmp: Path) -> None:
    """Leave STATE/current at the sample bundle, as a previous run would."""
    with running_agent(tmp, base_config(tmp)) as agent, agent.client() as c:
        assert c.get_json("/v2/models/digits")["versions"] == ["1.0.0"]


def test_fifo_as_model_bundle_is_refused_and_current_keeps_serving(tmp: Path) -> None:
    populate_current(tmp)
    fifo = tmp / "bundle.edgebundle"
    os.mkfifo(fifo)
    with running_agent(tmp, base_config(tmp, bundle=fifo)) as agent:
        wait_for_output(agent, "event model.refused")
        assert "is a FIFO (named pipe), not a regular file" in agent.output()
        images, labels = samples()
        with agent.client() as c:
            assert (c.infer("digits", {"input": images})["logits"].argmax(1) == labels).mean() > 0.9
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait_exit(60) == 0, agent.output()
    # With nothing in `current` and no link, a FIFO leaves nothing to serve: exit 1.
    shutil.rmtree(tmp / "state")
    err = run_fails(write_config(tmp / "agent.toml", base_config(tmp, bundle=fifo)))
    assert "cannot start [bundle.unreadable]" in err and "FIFO" in err


def test_a_second_agent_on_the_same_state_dir_is_refused_and_the_first_stays_reachable(
    tmp: Path,
) -> None:
    with running_agent(tmp, base_config(tmp)) as first:
        second = tmp / "second"
        second.mkdir()
        # Same state dir, own socket: refused by the lock.
        text = base_config(tmp).replace(str(tmp / "api.sock"), str(second / "api.sock"))
        err = run_fails(write_config(second / "agent.toml", text))
        assert (
            f"cannot start [start.locked]: another agent (pid {first.proc.pid}) is running "
            f"on state_dir {tmp / 'state'}"
        ) in err
        # Same config: refused before it could unlink the first one's socket.
        err = run_fails(first.config)
        assert "[start.locked]" in err
        # Own state dir, same socket: refused, the live socket is not replaced.
        text = base_config(tmp).replace(str(tmp / "state"), str(second / "state"))
        err = run_fails(write_config(second / "agent.toml", text))
        assert f"[start.failed]: api.socket: {first.socket} is in use" in err
        check = cli("check-config", str(first.config))
        assert check.returncode == 0, check.stdout
        assert f"warning [start.locked] state_dir: an agent (pid {first.proc.pid})" in check.stdout
        with first.client() as c:
            assert c.request("GET", "/v2/health/ready")[0] == 200
    assert (tmp / "state" / "agent.lock").exists()  # left for the next agent, no longer locked
    populate_current(tmp)


def slow_bundle(tmp: Path) -> tuple[Path, str]:
    """A bundle whose check cannot end while the test runs: 900 GiB of sparse file,
    hashed before anything else is read (the cap is raised to let it through)."""
    path = tmp / "huge.edgebundle"
    with path.open("wb") as fh:
        fh.truncate(900 * 1024**3)
    return path, "[bundle_limits]\nmax_bundle_mb = 1048576\n"


def test_current_serves_while_model_bundle_is_checked_and_sigterm_does_not_wait(
    tmp: Path,
) -> None:
    populate_current(tmp)
    huge, limits = slow_bundle(tmp)
    images, labels = samples()
    with running_agent(tmp, base_config(tmp, bundle=huge, extra=limits)) as agent:
        with agent.client() as c:
            assert c.get_json("/v2/models/digits")["versions"] == ["1.0.0"]
            assert (c.infer("digits", {"input": images})["logits"].argmax(1) == labels).mean() > 0.9
        agent.proc.send_signal(signal.SIGTERM)
        # Hang guard only: the check of 900 GiB would take many minutes.
        assert agent.wait_exit(60) == 0, agent.output()
    assert "abandoning it" in agent.output()
    assert not list((tmp / "state" / "bundles").glob(".unpack-*"))
    with running_agent(tmp, base_config(tmp)) as agent, agent.client() as c:
        assert c.get_json("/v2/models/digits")["versions"] == ["1.0.0"]


def test_with_no_current_the_api_is_up_and_not_ready_while_the_bundle_is_checked(
    tmp: Path,
) -> None:
    huge, limits = slow_bundle(tmp)
    config = write_config(tmp / "agent.toml", base_config(tmp, bundle=huge, extra=limits))
    agent = AgentProcess(config, tmp / "api.sock")
    try:
        wait_for_output(agent, "ready in")
        with agent.client() as c:
            assert c.request("GET", "/v2/health/live")[0] == 200
            status, _, body = c.request("GET", "/v2/health/ready")
            assert status == 503 and json.loads(body)["ready"] is False
            images, _ = samples()
            body = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "FP32",
                            "shape": [1, 1, 8, 8],
                            "data": images[0].ravel().tolist(),
                        }
                    ]
                }
            ).encode()
            status, _, answer = c.request("POST", "/v2/models/digits/infer", body)
            assert status == 503 and json.loads(answer)["code"] == "model.not_ready"
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait_exit(60) == 0, agent.output()
    finally:
        agent.stop()
    assert not (tmp / "api.sock").exists()


def test_an_internal_error_at_start_is_one_line_and_the_traceback_only_at_debug(
    tmp: Path,
) -> None:
    # The one fault injected on purpose: a bug cannot be asked for by any input.
    config = write_config(tmp / "agent.toml", base_config(tmp))
    script = (
        "import sys, agent.service as s\n"
        "def boom(self, config): raise RuntimeError('injected fault')\n"
        "s.Agent.__init__ = boom\n"
        "from agent.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for level in ("info", "debug"):
        out = subprocess.run(
            [sys.executable, "-c", script, "run", "--config", str(config), "--log-level", level],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 1, out.stderr
        assert (
            "cannot start [start.internal]: internal error: RuntimeError: injected fault"
            in out.stderr
        )
        assert ("Traceback" in out.stderr) == (level == "debug"), out.stderr


def test_watchdog_usec_that_is_not_a_positive_integer_is_ignored() -> None:
    from agent.sdnotify import Notifier

    for value in ("-400000", "0", "soon", ""):
        assert Notifier({"WATCHDOG_USEC": value}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "400000"}).watchdog_s == 0.4


def test_verify_refuses_a_fifo_bundle_or_key_without_blocking(tmp: Path) -> None:
    fifo = tmp / "x.fifo"
    os.mkfifo(fifo)
    out = cli("verify", str(fifo), "--key", str(DEMO_PUB))
    assert out.returncode == 1
    assert "REFUSED [bundle.unreadable]" in out.stdout and "FIFO" in out.stdout
    out = cli("verify", str(SAMPLE_BUNDLE), "--key", str(fifo))
    assert out.returncode == 2 and "--key[0]: cannot read" in out.stderr and "FIFO" in out.stderr


def test_a_status_with_a_newline_stays_one_sd_notify_field(tmp: Path) -> None:
    from agent.sdnotify import Notifier

    path = tmp / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": str(path)}).status("checking /x\nMAINPID=1")
        assert server.recv(4096).decode() == "STATUS=checking /x MAINPID=1"
