"""The device-facing CLI (`devices`, `watch`, `ping`, `status`, `config`, `infer`,
`logs`) through `fleet.cli.main` in-process and one real `edge-fleet` subprocess,
against real agents on a real mosquitto; every command sent is in the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.cli import main
from fleet.ports import RecordKind
from fleet.store import open_store
from tests.fleet._agents import agents
from tests.helpers import ROOT, AgentProcess, samples
from tests.mqtt_broker import Broker, free_port

DEVICES = ["cli-a", "cli-b"]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, broker: Broker, console_pub: Path
) -> Iterator[dict[str, AgentProcess]]:
    directory = tmp_path_factory.mktemp("agents")
    with agents(directory, broker, DEVICES, console_pub, groups=["line-9"]) as procs:
        yield procs


@pytest.fixture
def cli(
    fleet: dict[str, AgentProcess],
    fleet_toml: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[int, Any, str]]:
    """cli(*argv) -> (exit status, stdout parsed as JSON when --json else text, stderr)."""
    config = fleet_toml(tmp_path)

    def run(*argv: str) -> tuple[int, Any, str]:
        capsys.readouterr()
        code = main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        if "--json" not in argv:
            return code, out, err
        docs = [json.loads(line) for line in out.splitlines() if line.strip()]
        return code, docs[0] if len(docs) == 1 else docs, err  # watch: one a line

    run.config = config  # type: ignore[attr-defined]
    return run


def test_devices_lists_every_device(cli: Callable[..., tuple[int, Any, str]]) -> None:
    code, rows, _ = cli("--json", "devices")
    assert code == 0
    assert [r["device_id"] for r in rows] == DEVICES
    for row in rows:
        assert row["online"] is True and row["model_version"] == "1.0.0"
        assert row["groups"] == ["line-9"] and row["health"] == "ready"
        assert row["variant"] == "onnx" and "model.preference" in row["variant_reason"]
    code, text, _ = cli("devices", "--sort", "rss")
    assert code == 0 and "cli-a" in text and "cli-b" in text and "online" in text
    assert "variant" in text and " onnx " in text
    assert "2 devices: 2 online, 0 offline" in text
    code, rows, _ = cli("--json", "devices", "--group", "nobody")
    assert code == 0 and rows == []
    # --telemetry waits for a report from each device.
    code, rows, _ = cli("devices", "--telemetry", "30", "--json")  # --json after it, too
    assert code == 0 and all(r["telemetry_ts"] and r["rss_mb"] for r in rows)
    # Once they reported, a one-shot listing has their figures at once: the newest
    # report is retained by the broker.
    code, rows, _ = cli("--json", "devices")
    assert code == 0 and all(r["telemetry_ts"] and r["rss_mb"] for r in rows)


def test_ping_status_logs_and_the_record(cli: Callable[..., tuple[int, Any, str]]) -> None:
    code, out, _ = cli("--json", "ping", "cli-a")
    assert code == 0 and out["ok"] is True and out["result"]["device_id"] == "cli-a"
    code, out, err = cli("ping", "group:line-9")
    assert code == 0 and "2/2 answered ping" in out
    assert "ping group:line-9: 2/2 answered, 2 ok, 0 failed" in err  # progress on stderr
    code, out, _ = cli("--json", "status", "cli-b")
    assert code == 0 and out["status"]["link"]["connected"] is True
    assert out["status"]["model"]["selection"]["chosen"] == "onnx"
    # The human form ends with the device's variant choice, as a line and a table.
    code, text, _ = cli("status", "cli-b")
    assert code == 0 and "variant onnx on onnxruntime: the bundle has no variants" in text
    assert "tflite" in text and "skipped" in text
    assert out["row"]["device_id"] == "cli-b"
    code, out, _ = cli("--json", "logs", "cli-a", "--lines", "3", "--level", "info")
    assert code == 0 and 0 < len(out["lines"]) <= 3
    # Every command and its reply is recorded, with who sent it.
    db = Path(str(cli.config)).with_name("fleet.db")  # type: ignore[attr-defined]
    store = open_store(db)
    try:
        sent = store.records(kinds=[RecordKind.COMMAND_SENT])
        replies = store.records(kinds=[RecordKind.COMMAND_REPLY])
    finally:
        store.close()
    assert [r.data["name"] for r in sent] == ["ping", "ping", "ping", "status", "status", "logs"]
    assert {r.operator for r in sent} == {"tester"} and all(len(r.key_id) == 16 for r in sent)
    assert sorted(r.data["command_id"] for r in replies) == sorted(
        r.data["command_id"] for r in sent
    )
    assert all(r.result == "ok" for r in replies)
    assert sent[-1].data["args"] == {"lines": 3, "level": "info"}


def test_config_set_and_get(cli: Callable[..., tuple[int, Any, str]]) -> None:
    code, out, _ = cli("--json", "config", "set", "cli-a", "telemetry.interval_s=0.5",
                       "log_level=info")  # fmt: skip
    assert code == 0 and out["applied"] == {"telemetry.interval_s": 0.5, "log_level": "info"}
    code, out, _ = cli("--json", "config", "get", "cli-a", "telemetry.interval_s")
    assert code == 0 and out["values"] == {"telemetry.interval_s": 0.5}
    # The device's refusal: its code and message, exit 2.
    code, out, err = cli("--json", "config", "set", "cli-a", "mqtt.port=1")
    assert code == 2 and out["error"]["code"] == "console.refused"
    assert out["error"]["device_code"] == "config.not_tunable"
    assert "edge-fleet: [console.refused] cli-a refused config.set: [config.not_tunable]" in err
    for bad in (["cli-a", "novalue"], ["cli-a", "a=1", "a=2"], ["cli-a", "x=[1]"],
                ["cli-a", "x=NaN"]):  # fmt: skip
        code, out, _ = cli("--json", "config", "set", *bad)
        assert code == 2 and out["error"]["code"] == "console.bad_input", bad


def test_infer_from_npy_and_kserve_json(
    cli: Callable[..., tuple[int, Any, str]], tmp_path: Path
) -> None:
    x, labels = samples()
    npy = tmp_path / "x.npy"
    np.save(npy, np.asarray(x[:3], np.float32))
    code, out, _ = cli("--json", "infer", "cli-b", "--input", str(npy))
    assert code == 0
    logits = np.asarray(out["outputs"][0]["data"]).reshape(3, -1)
    assert list(logits.argmax(axis=1)) == list(labels[:3])
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *x.shape[1:]],
                       "data": np.asarray(x[:1], np.float32).reshape(-1).tolist()}]}  # fmt: skip
    kserve = tmp_path / "x.json"
    kserve.write_text(json.dumps(doc))
    code, text, _ = cli("infer", "cli-b", "--input", str(kserve))
    assert code == 0 and "digits 1.0.0" in text and "logits FP32 [1, 10]" in text
    for name, content in (("bad.npy", b"nope"), ("bad.json", b'{"inputs": 3}')):
        (tmp_path / name).write_bytes(content)
        code, out, _ = cli("--json", "infer", "cli-b", "--input", str(tmp_path / name))
        assert code == 2 and out["error"]["code"] == "console.bad_input"
    code, out, _ = cli("--json", "infer", "cli-b", "--input", str(tmp_path / "missing.npy"))
    assert code == 2 and "cannot read" in out["error"]["message"]
    # A tensor the model does not take: the device's own code comes back.
    doc["inputs"][0]["shape"] = [1, 3]
    doc["inputs"][0]["data"] = [1.0, 2.0, 3.0]
    kserve.write_text(json.dumps(doc))
    code, out, _ = cli("--json", "infer", "cli-b", "--input", str(kserve))
    assert code == 2 and out["error"]["code"] == "console.refused"
    assert out["error"]["device_code"] == "input.mismatch"


def test_errors_reach_the_operator_as_codes(
    cli: Callable[..., tuple[int, Any, str]], tmp_path: Path
) -> None:
    code, out, err = cli("--json", "ping", "nobody")
    assert code == 2 and out["error"]["code"] == "console.unknown_device"
    assert "nobody has never been seen" in err
    code, out, _ = cli("--json", "ping", "group:")
    assert code == 2 and out["error"]["code"] == "console.bad_input"
    port = free_port()
    code, out, err = cli("--json", "--broker", f"mqtt://127.0.0.1:{port}", "devices")
    assert code == 2 and out["error"]["code"] == "console.broker_unreachable"
    assert f"127.0.0.1:{port}" in err
    code, out, _ = cli("--json", "--broker", "tcp://x", "devices")
    assert code == 2 and out["error"]["code"] == "console.config"
    code, out, _ = cli("--json", "--key", str(tmp_path / "no.key"), "ping", "cli-a")
    assert code == 2 and out["error"]["code"] == "console.config"
    assert out["error"]["key"] == "key"


def test_watch_once_and_as_json_lines(cli: Callable[..., tuple[int, Any, str]]) -> None:
    code, text, _ = cli("watch", "--once", "--sort", "p95")
    assert code == 0 and "cli-a" in text and "sorted by p95" in text
    code, lines, _ = cli("--json", "watch", "--for", "0.3", "--interval", "0.1")
    assert code == 0 and len(lines) >= 2  # one snapshot a refresh
    assert all([r["device_id"] for r in doc["devices"]] == DEVICES for doc in lines)
    code, text, _ = cli("watch", "--for", "0.3", "--interval", "0.1")  # rich Live, redrawn
    assert code == 0 and "cli-b" in text and "2 devices: 2 online" in text


def test_a_real_edge_fleet_process(cli: Callable[..., tuple[int, Any, str]]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "--config", str(cli.config), "--json",  # type: ignore[attr-defined]
         "ping", "all"],
        check=False, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["device_id"] for r in out["results"]] == DEVICES and out["failed"] == 0
    assert proc.stderr == ""  # --json: no progress lines mixed in


def test_an_offline_device(
    cli: Callable[..., tuple[int, Any, str]], fleet: dict[str, AgentProcess]
) -> None:
    """Last in the module: it kills cli-b."""
    fleet["cli-b"].proc.kill()
    fleet["cli-b"].proc.wait()
    deadline_rows: list[dict[str, Any]] = []
    for _ in range(600):  # bounded: until the broker published the last will
        _, rows, _ = cli("--json", "devices")
        deadline_rows = rows
        if any(r["device_id"] == "cli-b" and r["online"] is False for r in rows):
            break
    assert any(r["device_id"] == "cli-b" and r["online"] is False for r in deadline_rows)
    code, out, err = cli("--json", "ping", "cli-b")
    assert code == 2 and out["error"]["code"] == "console.device_offline"
    code, out, _ = cli("--json", "ping", "group:line-9")
    assert code == 1 and out["failed"] == 1
    assert [r["ok"] for r in out["results"]] == [True, False]
    assert out["results"][1]["code"] == "console.device_offline"
    code, out, _ = cli("--json", "ping", "cli-b", "--wait", "--timeout", "0.3")
    assert code == 2 and out["error"]["code"] == "console.timeout"
    assert "it is offline" in out["error"]["message"]
    code, text, _ = cli("devices")
    assert "offline" in text and "1 offline" in text


def test_a_devices_variant_strings_print_as_text_never_as_markup() -> None:
    """The selection comes from the device: brackets in it are its words (an error code,
    a reason quoting markup), and a malformed `variants` is no table, not a crash."""
    import io

    from rich.console import Console

    from fleet.cli.variant_table import print_selection

    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    status = {"model": {"selection": {
        "chosen": "onnx[/]", "runtime": "onnxruntime", "reason": "bad [/bold] tag",
        "variants": [{"id": "tflite", "status": "failed", "code": "runtime.load_failed",
                      "reason": "boom [red]", "precision": "fp32"}],
    }}}  # fmt: skip
    print_selection(console, status)
    text = out.getvalue()
    assert "variant onnx[/] on onnxruntime: bad [/bold] tag" in text
    assert "[runtime.load_failed] boom [red]" in text
    status["model"]["selection"]["variants"] = 5  # type: ignore[index]
    print_selection(console, status)
    assert out.getvalue().count("variant onnx[/]") == 2
