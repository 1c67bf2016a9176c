"""`edge-agent run` with `update.repository`: a real agent process polls a real HTTP server."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.signing import load_private_key
from agent.update.index import COUNTER_FILE
from tests.agent.update.index.conftest import Served, release, signed
from tests.helpers import DEMO_KEY, base_config, running_agent


def _config(tmp: Path, url: str, extra: str = "") -> str:
    return base_config(tmp, extra=f'[update]\nrepository = "{url}"\npoll_s = 0.2\n{extra}')


def _wait(predicate: object, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_agent_polls_the_index_and_refuses_an_expired_one(
    tmp: Path, http_server: Served
) -> None:
    key = load_private_key(DEMO_KEY)  # trust.public_keys is the demo key
    http_server.files["/index.json"] = (200, signed(key, 4, release("1.0.0", "digits"), days=-1))
    with running_agent(tmp, _config(tmp, http_server.url())) as agent:
        assert _wait(lambda: "update.index_expired" in agent.output())
        assert "Traceback" not in agent.output()
        assert not (tmp / "state" / COUNTER_FILE).exists()  # an expired index moves nothing
        # A fresh index with nothing newer than what is served: accepted, nothing deployed.
        http_server.files["/index.json"] = (200, signed(key, 4, release("1.0.0", "digits")))
        assert _wait(lambda: (tmp / "state" / COUNTER_FILE).exists())
        assert json.loads((tmp / "state" / COUNTER_FILE).read_text())["counter"] == 4
        hits = http_server.hits
        assert _wait(lambda: http_server.hits >= hits + 2)  # it keeps polling
        assert "update.pull:" not in agent.output()


def test_an_index_signed_by_an_untrusted_key_is_refused(tmp: Path, http_server: Served) -> None:
    http_server.files["/index.json"] = (
        200,
        signed(Ed25519PrivateKey.generate(), 1, release("2.0.0", "digits")),
    )
    with running_agent(tmp, _config(tmp, http_server.url())) as agent:
        assert _wait(lambda: "update.index_invalid" in agent.output())
        assert "not trusted" in agent.output()
        assert "Traceback" not in agent.output()


def test_unreadable_index_keys_stop_the_start_with_the_key_named(tmp: Path) -> None:
    from tests.helpers import AgentProcess, write_config

    config = write_config(
        tmp / "agent.toml",
        _config(tmp, "http://127.0.0.1:9/index.json", f'index_keys = ["{tmp}/missing.pub"]'),
    )
    agent = AgentProcess(config, tmp / "api.sock")
    try:
        code = agent.proc.wait(timeout=120)
    finally:
        agent.stop()
    assert code != 0
    assert "update.index_keys[0]" in agent.output() and "Traceback" not in agent.output()
