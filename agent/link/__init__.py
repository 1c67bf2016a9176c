"""The MQTT link to the fleet (off unless `mqtt.enabled`): see docs/mqtt.md."""

from __future__ import annotations

from typing import Any

from agent.config.typed import ConfigError


def components_for(agent: Any) -> list[Any]:
    """What `edge-agent run` attaches to the agent: the link, or nothing when offline."""
    if not agent.config.mqtt.enabled:
        return []
    from agent.link.link import Link
    from agent.outbox import OutboxError
    from agent.service import StartupError

    try:
        return [Link(agent)]
    except (ConfigError, OutboxError) as exc:
        raise StartupError(str(exc)) from exc
