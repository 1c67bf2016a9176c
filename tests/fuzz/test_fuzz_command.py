"""A bounded atheris run of the MQTT command dispatcher (a few seconds)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.protocol.canonical import sign_body
from tests.fuzz import run_harness
from tests.fuzz.fuzz_command import DEVICE, KEY, REPLY


def _seeds() -> list[bytes]:
    now = time.time()

    def cmd(name: str, args: dict[str, Any], signed: bool, **fields: Any) -> bytes:
        body = {"id": f"seed-{name}", "name": name, "args": args, "to": DEVICE,
                "issued_at": now, "expires_at": now + 3000, **fields}  # fmt: skip
        return json.dumps(sign_body(body, KEY) if signed else body).encode()

    # First byte: mode (bit 0 signed, bit 1 v5 response topic); second: the topic.
    return [
        b"\x03\x00" + cmd("ping", {}, True),
        b"\x02\x01" + cmd("config.get", {"keys": ["mqtt.port", "log_level"]}, False),
        b"\x02\x02" + cmd("config.set", {"values": {"log_level": "info"}}, False),
        b"\x00\x03" + cmd("logs", {"lines": 3, "level": "info"}, False, reply_to=REPLY),
        b"\x01\x00" + cmd("ping", {}, True, reply_to=REPLY),
        b'\x02\x00{"id": "\\ud800", "name": "ping"}',
        b"\x02\x00" + b"[" * 60,
    ]


def test_command_dispatcher_holds_its_contract(tmp_path: Path) -> None:
    out = run_harness("command", runs=3000, max_len=1024, seeds=_seeds(), workdir=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Done 3000 runs" in out.stderr, out.stderr[-2000:]


def test_twin_decoder_holds_its_contract(tmp_path: Path) -> None:
    seeds = [
        json.dumps(
            {
                "event_id": "e",
                "timestamp": 1,
                "delta": {"model_version": "2.0.0"},
                "twin": {
                    "model_version": {
                        "expected": {"value": "2.0.0"},
                        "metadata": {"type": "string"},
                    }
                },
            }
        ).encode(),
        b'{"twin": {"a": {"actual": {"value": "\\ud800"}}}}',
        b'{"delta": {"p": 1}}',
    ]
    out = run_harness("twin", runs=3000, max_len=1024, seeds=seeds, workdir=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Done 3000 runs" in out.stderr, out.stderr[-2000:]
