"""Steps the update system tests share: deploy and wait for the outcome, read its code."""

from __future__ import annotations

import time
from typing import Any

from tests.update_rig import Rig

FINAL = {"update.committed", "update.failed", "update.rolled_back", "update.cancelled"}
# The phases of a good hot update, in order (shadow and trial only when asked for).
GOOD_PHASES = [
    "update.downloading",
    "update.verifying",
    "update.validating",
    "update.swapping",
    "update.committed",
]
# A short trial of a model known to be good: the p95 bound is loosened because half a
# second of p95 on a loaded 2-core box is noise (with the default ratio 2 an identical
# model was seen rolled back: 2.x ms against a 0.9 ms baseline). Tests about p95 set it.
QUICK_TRIAL = {"window_s": 0.5, "min_requests": 0, "max_p95_ratio": 50}


def code_of(event_or_reply: dict[str, Any]) -> str:
    """The `update.*` code of a refusal reply or an `update.failed`/`rolled_back` event."""
    if "ok" in event_or_reply:
        return str((event_or_reply.get("error") or {}).get("code", ""))
    data = event_or_reply.get("data") or {}
    for key in ("code", "error_code"):
        if isinstance(data.get(key), str):
            return str(data[key])
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return str(error["code"])
    return ""


def message_of(event_or_reply: dict[str, Any]) -> str:
    if "ok" in event_or_reply:
        return str((event_or_reply.get("error") or {}).get("message", ""))
    data = event_or_reply.get("data") or {}
    return str(event_or_reply.get("reason") or data.get("message") or "")


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(any(k == w for k in it) for w in wanted)


def deploy(
    rig: Rig, args: dict[str, Any], timeout: float = 240, busy_retry_s: float = 0.0
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Send `deploy`; when accepted, wait for its final event. (reply, final event or None).
    With `busy_retry_s`, an `update.busy` refusal is retried that long (as a console would)."""
    after = rig.console.last_seq()
    reply = rig.console.deploy(args)
    deadline = time.monotonic() + busy_retry_s
    while code_of(reply) == "update.busy" and time.monotonic() < deadline:
        time.sleep(0.1)
        reply = rig.console.deploy(args)
    if not reply.get("ok"):
        return reply, None
    result = reply["result"]
    assert result.get("accepted") is True and isinstance(result.get("job"), str), reply
    return reply, rig.console.wait_event(FINAL, timeout, after=after)


def wait_version(rig: Rig, version: str, timeout: float = 60) -> None:
    from tests.update_rig import served_version

    assert rig.agent is not None
    deadline = time.monotonic() + timeout
    while served_version(rig.agent) != version:
        assert time.monotonic() < deadline, f"{version} never served; {rig.console.kinds()}"
        time.sleep(0.05)


def no_traceback(rig: Rig) -> None:
    assert rig.agent is not None
    assert "Traceback" not in rig.agent.output(), rig.agent.output()[-4000:]


def after_final(rig: Rig, name: str, args: dict[str, Any], retry_s: float = 30) -> dict[str, Any]:
    """A command sent right after a job's final event, retried while `update.busy` (the job
    thread used to outlive its final event; test_deploy.py checks that it no longer does,
    so here the retry only keeps other tests about other things)."""
    deadline = time.monotonic() + retry_s
    reply = rig.console.request(name, args)
    while code_of(reply) == "update.busy" and time.monotonic() < deadline:
        time.sleep(0.1)
        reply = rig.console.request(name, args)
    return reply
