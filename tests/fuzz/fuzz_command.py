"""Fuzz the MQTT command dispatcher (bytes + topic in, one Response or None out).

Contract, whatever the bytes and the topic: `Dispatcher.handle` returns None or a
Response whose topic is a console reply topic, whose payload is strict JSON equal to
its reply, and whose error code is never `command.failed` (an internal error); every
refusal it reports can be encoded as an event (no lone surrogates, no NaN); nothing
is logged at ERROR. The first input byte picks the mode (signatures required or not,
MQTT v5 response topic or the body's `reply_to`), the second the topic.

    python tests/fuzz/fuzz_command.py -runs=100000
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris
import numpy  # noqa: F401  (imported first, uninstrumented: only the parsers are traced)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

with atheris.instrument_imports():
    from agent.link import commands, replies
    from agent.protocol import canonical, messages, topics
    from agent.protocol import commands as protocol_commands  # noqa: F401  (the checks)

from agent.config.loader import parse_config
from agent.link.handlers import build_table
from agent.link.logring import LogRing
from agent.link.tunables import Tunables
from agent.service import Agent
from tests.helpers import DEMO_PUB, SAMPLE_BUNDLE

DEVICE = "fuzz-dev"
GROUP = "lab"
REPLY = "edgerun/v1/console/fuzz/reply"
# A fixed key, so the test's seeds carry signatures this harness trusts.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
TOPICS = [
    f"edgerun/v1/{DEVICE}/cmd/ping",
    f"edgerun/v1/{DEVICE}/cmd/config.get",
    f"edgerun/v1/{DEVICE}/cmd/config.set",
    f"edgerun/v1/{DEVICE}/cmd/logs",
    f"edgerun/v1/{DEVICE}/cmd/status",
    f"edgerun/v1/group/{GROUP}/cmd/ping",
    "edgerun/v1/other-dev/cmd/ping",
    f"edgerun/v1/{DEVICE}/telemetry",
]
RESPONSE_TOPICS = [REPLY, f"edgerun/v1/{DEVICE}/telemetry", "edgerun/v1/console/+/reply"]


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _report(code: str, message: str, **data: Any) -> None:
    # What the outbox does with a refusal event; it must never fail.
    messages.dumps({"kind": "command.refused", "reason": message, "code": code, **data})
    assert code != messages.Code.FAILED and message


def _setup() -> tuple[commands.Dispatcher, commands.Dispatcher, ErrorLog]:
    work = Path(tempfile.mkdtemp(prefix="fuzz-command-"))
    config = parse_config(
        {"device_id": DEVICE, "state_dir": str(work / "state"), "api": {"socket": None},
         "trust": {"public_keys": [str(DEMO_PUB)]}, "model": {"bundle": str(SAMPLE_BUNDLE)},
         "mqtt": {"groups": [GROUP]}},
        environ={},
    )  # fmt: skip
    agent = Agent(config)
    agent.load_initial_model()
    table = build_table(agent, Tunables(agent), LogRing(50), dict)
    made = []
    for signed in (True, False):
        cache = replies.ReplyCache(work / f"replies-{signed}.sqlite", 50, 600.0)
        made.append(commands.Dispatcher(DEVICE, [GROUP], table, [KEY.public_key()], signed,
                                        16 * 1024, cache, _report))  # fmt: skip
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.WARNING)
    return made[0], made[1], errors


SIGNED, OPEN, ERRORS = _setup()


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, which, payload = data[0], data[1], data[2:]
    dispatcher = SIGNED if mode & 1 else OPEN
    response_topic = RESPONSE_TOPICS[(mode >> 1) % len(RESPONSE_TOPICS)] if mode & 2 else None
    topic = TOPICS[which % len(TOPICS)]
    response = dispatcher.handle(commands.Request(topic, payload, response_topic, b"c"))
    if ERRORS.records:
        record = ERRORS.records[0]
        raise AssertionError(f"logged an error: {record.getMessage()}\n{record.exc_text or ''}")
    if response is None:
        return
    assert topics.is_reply_topic(str(response.topic)), response.topic
    assert messages.loads(response.payload) == response.reply.to_json()
    if response.reply.error is not None:
        assert response.reply.error.code != messages.Code.FAILED, response.reply
        assert response.reply.error.message
    _ = canonical  # instrumented: the signature check runs through it


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
