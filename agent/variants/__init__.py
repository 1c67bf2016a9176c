"""The device picks the variant of a bundle it serves (docs/DESIGN.md "Variant selection").

Submodules: `select` (the choice), `latency`, `cache`, `fingerprint`, `report` (the
figures), `errors`. Nothing is imported here: agent.serving imports `report`, and
`select` imports agent.serving.
"""
