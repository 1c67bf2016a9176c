"""What a command needs, built on first use: the config, the MQTT client and fleet
view, the record store. Commands that need no broker never connect to one."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = bool(getattr(args, "json", False))
        self._closers: list[Any] = []

    def close(self) -> None:
        for closer in reversed(self._closers):
            # Closing must not hide the command's own result.
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
