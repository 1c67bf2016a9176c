"""The onnxruntime session options of bench/peers.py's peers (and its bare runs).

MLServer's custom runtime and the FastAPI endpoint open their sessions with ORT's
defaults, as their docs' examples do (intra-op spinning on), unless
PEERS_ORT_SPINNING is "0": then with the agent's own default, spinning off. peers.py
runs one MLServer each way, so the agent is compared with MLServer as it ships and
with MLServer given the agent's options. Imported by the peers in their own venv too
(PYTHONPATH is bench/).
"""

from __future__ import annotations

import os
from typing import Any

ENV = "PEERS_ORT_SPINNING"


def spinning() -> bool:
    return os.environ.get(ENV, "1") != "0"


def session_options(spin: bool | None = None) -> Any:
    """ORT's defaults, with intra-/inter-op spinning as `spin` (default: the env)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not (spinning() if spin is None else spin):
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options
