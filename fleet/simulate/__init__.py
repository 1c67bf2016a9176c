"""Simulated devices: N light devices in one process that speak the agent's MQTT contract.

`simulator.py` (the `Simulator`: connections, subscriptions, the fleet's knobs),
`device.py` (one device: streams, commands, the update job as timers), `commands.py`
(the device's command checks from `agent.protocol.commands`, with an in-memory reply
cache) and `loop.py` (one selector thread drives every connection and timer).
"""

from fleet.simulate.device import Knobs, Signal, SimDevice
from fleet.simulate.simulator import Simulator

__all__ = ["Knobs", "Signal", "SimDevice", "Simulator"]
