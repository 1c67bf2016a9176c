"""A bounded atheris run of the request-head parser and KServe decoder (a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fuzz import run_harness


def _seeds() -> list[bytes]:
    body = json.dumps(
        {
            "id": "a",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            "parameters": {"binary_data_output": False},
        }
    ).encode()
    binary_head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "UINT8",
                    "shape": [2],
                    "parameters": {"binary_data_size": 2},
                }
            ]
        }
    ).encode()
    return [
        b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n"
        b"expect: 100-continue\r\n\r\n" % len(body) + body,
        b"GET /v2 HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
        b"\x01" + bytes([len(binary_head)]) + binary_head + b"\x01\x02",
        body,
        b"[" * 80,
    ]


def test_request_parsers_hold_their_contract(tmp_path: Path) -> None:
    out = run_harness("request", runs=4000, max_len=2048, seeds=_seeds(), workdir=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Done 4000 runs" in out.stderr, out.stderr[-2000:]
