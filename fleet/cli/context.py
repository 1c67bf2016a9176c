"""What a command needs, built on first use: the config, the MQTT client and fleet
view, the record store. Commands that need no broker never connect to one.

    cfg = ctx.config                 # fleet.toml (--config, else ./fleet.toml) + globals
    client = ctx.client()            # connected FleetClient; its commands are recorded
    view = ctx.view()                # started FleetView (retained messages in)
    store = ctx.store()              # fleet.store.open_store(cfg.db)
    ctx.emit(data, human)            # --json: data as JSON; else human(console)

Every command the client sends goes to the record (COMMAND_SENT / COMMAND_REPLY with
who = (key id, operator)) through a batching CommandRecorder, written before `close()`
returns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleet.config import FleetConfig
from fleet.errors import FleetCode, FleetError

if TYPE_CHECKING:
    from rich.console import Console

    from fleet.mqtt import FleetClient
    from fleet.ports import Store
    from fleet.recorder import CommandRecorder
    from fleet.view import FleetView


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = bool(getattr(args, "json", False))
        self._closers: list[Callable[[], Any]] = []
        self._config: FleetConfig | None = None
        self._client: FleetClient | None = None
        self._view: FleetView | None = None
        self._store: Store | None = None
        self._recorder: CommandRecorder | None = None
        self.record_commands = True  # a command may turn it off (nothing to record)

    # ------------------------------------------------------------------ parts

    @property
    def config(self) -> FleetConfig:
        if self._config is None:
            a = self.args
            self._config = FleetConfig.load(
                getattr(a, "config", None),
                broker=getattr(a, "broker", None),
                db=getattr(a, "db", None),
                key=getattr(a, "key", None),
                operator=getattr(a, "operator", None),
            )
        return self._config

    def store(self) -> Store:
        if self._store is None:
            try:
                from fleet.store import open_store
            except ImportError as exc:  # pragma: no cover - the store ships with the console
                raise FleetError(
                    FleetCode.STORE, f"the record store is not available: {exc}"
                ) from None
            self._store = open_store(self.config.db)
            self._closers.append(self._store.close)
        return self._store

    def who(self) -> tuple[str, str]:
        client = self._client
        return (client.key_id if client is not None else "", self.config.operator)

    def client(self, timeout_s: float | None = None) -> FleetClient:
        if self._client is None:
            from fleet.mqtt import FleetClient

            client = FleetClient(self.config)
            if self.record_commands:
                self._wire_record(client)
            client.connect(timeout_s)
            self._client = client
            self._closers.append(client.close)
        return self._client

    def _wire_record(self, client: FleetClient) -> None:
        """Open the record before anything is sent: a command that cannot be recorded
        is not sent."""
        from fleet.recorder import CommandRecorder

        recorder = CommandRecorder(self.store(), (client.key_id, self.config.operator))
        client.on_sent = recorder.sent
        client.on_reply = recorder.reply
        self._recorder = recorder
        # Closed after the client (closers run in reverse): late replies are recorded.
        self._closers.append(self._close_recorder)

    def _close_recorder(self) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        try:
            recorder.close()
        except FleetError as exc:  # said, not raised: the command's own result stands
            print(f"edge-fleet: warning: commands not all recorded in {self.config.db}: "
                  f"{exc.message}", file=sys.stderr)  # fmt: skip

    def view(
        self, settle_s: float = 10.0, device: str | None = None, follow: bool = True
    ) -> FleetView:
        """The fleet view, started (returns once the retained messages are in).
        `device`: watch that one device only (a single-device command needs no more)."""
        if self._view is None:
            from fleet.view import FleetView

            self._view = FleetView(self.client(), device=device).start(settle_s, follow=follow)
            self._closers.append(self._view.close)
        return self._view

    # ------------------------------------------------------------------ output

    def console(self, stderr: bool = False) -> Console:
        from rich.console import Console

        stream = sys.stderr if stderr else sys.stdout
        # Piped or captured output gets whole rows, not a table cut to 80 columns.
        width = None if stream.isatty() else 250
        return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)

    def emit(self, data: Any, human: Callable[[Console], None] | None = None) -> None:
        """--json: `data` as one JSON document on stdout; else `human(console)` (or the
        JSON pretty-printed when there is no human form)."""
        if self.json or human is None:
            print(json.dumps(data, indent=None if self.json else 2, default=str, sort_keys=False))
            return
        human(self.console())

    def progress(self, message: str) -> None:
        """A progress line on stderr (never in --json's stdout)."""
        if not self.json:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        for closer in reversed(self._closers):
            # Closing must not hide the command's own result.
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
