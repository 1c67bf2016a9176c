"""Message schemas shared by the device agent and the fleet console.

Only the standard library and `cryptography` are imported here, so the console
can depend on this package without pulling in the agent.
"""
