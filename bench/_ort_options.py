"""The onnxruntime session options every server in bench/peers.py gets (and the bare
run in the bench process): ORT's defaults, with intra-op spinning on or off as
PEERS_ORT_SPINNING says ("1", the default, or "0"). Spinning idle pool threads burn
CPU that counts in a server's CPU per request, so every peer must be run alike.
Imported by the peers in their own venv too (PYTHONPATH is bench/)."""

from __future__ import annotations

import os
from typing import Any

ENV = "PEERS_ORT_SPINNING"


def spinning() -> bool:
    return os.environ.get(ENV, "1") != "0"


def session_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning():
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options
