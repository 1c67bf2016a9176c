"""Getting a bundle onto the device: the two `Fetcher`s (agent/update/ports.py).

| module | what it does |
|---|---|
| ``http.py`` | ``HttpFetcher``: resumable HTTP(S) (``Range`` + ``If-Range``), verified TLS, capped redirects, retries with jittered backoff, bandwidth cap |
| ``mqtt.py`` | ``MqttFetcher``: chunks on ``…/bundle/{transfer_id}``, a persisted bitmap of what arrived, "need" messages for the rest |
| ``partial.py`` | the partial file ``STATE/incoming/<sha256>.part`` and its sidecars; writes never past the signed size; ENOSPC as ``update.no_space`` |
| ``ratelimit.py`` | the token bucket behind ``update.max_kbps`` and the capped, jittered backoff |

Both write into the partial file the job names and, once the whole file's sha256 is
the signed one, rename it to ``<sha256>.bundle`` beside it and return that path.
A fetch that is cut (a drop, a restart, a cancel) leaves the partial file and its
sidecars in place; the next fetch of the same sha256 resumes from them.
"""

from __future__ import annotations

from agent.update.fetch.http import HttpFetcher, HttpSettings
from agent.update.fetch.mqtt import MqttFetcher, MqttSettings
from agent.update.fetch.partial import complete_path

__all__ = ["HttpFetcher", "HttpSettings", "MqttFetcher", "MqttSettings", "complete_path"]
