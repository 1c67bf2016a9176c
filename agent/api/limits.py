"""File descriptors and threads the local API needs, so the unit and the config agree.

`systemd/edgerun-agent.service` sets LimitNOFILE= and TasksMax= at least as high as
these for the default config (tests/system/test_systemd.py checks it); at start the
agent raises its soft fd limit as far as needed and, when the hard limit is lower,
serves fewer connections and says so.
"""

from __future__ import annotations

import logging
import resource

from agent.config.model import ApiConfig

log = logging.getLogger(__name__)

# The agent's own descriptors and threads besides connections: listeners, the model
# and runtime libraries, the outbox, MQTT, asyncio's executor, ORT's thread pools.
BASE_FDS = 128
BASE_TASKS = 64


def needed_fds(config: ApiConfig) -> int:
    # Each connection holds one descriptor while served and may hold one more while a
    # refused one lingers (Lingerer's capacity is max_connections).
    return BASE_FDS + 2 * config.max_connections


def needed_tasks(config: ApiConfig) -> int:
    return BASE_TASKS + config.max_connections


def fit_connections(config: ApiConfig) -> int:
    """api.max_connections, or fewer when RLIMIT_NOFILE cannot be raised to fit them."""
    need = needed_fds(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return config.max_connections
    fitting = max(1, (soft - BASE_FDS) // 2)
    log.warning(
        "api.max_connections = %d needs about %d file descriptors but the limit is %d "
        "(LimitNOFILE=): serving at most %d connections",
        config.max_connections,
        need,
        soft,
        fitting,
    )
    return fitting
