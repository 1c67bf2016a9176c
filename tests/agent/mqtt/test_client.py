"""The paho wrapper's own rules: backoff, errors instead of paho return codes."""

from __future__ import annotations

import random

import pytest

from agent.link.client import Backoff, ClientSettings, MqttClient, NotConnectedError
from agent.protocol.topics import Topic, TopicFilter


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(7))
    waits = [backoff.next() for _ in range(8)]
    bounds = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(b / 2 <= w <= b for w, b in zip(waits, bounds, strict=True)), waits
    assert len(set(waits)) == len(waits)  # jittered: devices do not reconnect in lockstep
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_without_a_connection_calls_raise_our_error() -> None:
    client = MqttClient(ClientSettings("127.0.0.1", 1, "x"))
    with pytest.raises(NotConnectedError, match="not connected to 127.0.0.1:1"):
        client.publish(Topic("a/b"), b"")
    with pytest.raises(NotConnectedError):
        client.subscribe([TopicFilter("a/#")])
