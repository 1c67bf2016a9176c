"""systemd's sd_notify protocol (READY, WATCHDOG, STATUS, STOPPING) over $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET")
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_s: float | None = None
        if usec and (pid is None or pid == str(os.getpid())):
            try:
                value = int(usec)
            except ValueError:
                value = 0
            # Zero or negative would have the watchdog task pet systemd in a busy loop.
            if value > 0:
                self.watchdog_s = value / 1_000_000
            else:
                log.warning("ignoring WATCHDOG_USEC=%r: not a positive integer", usec)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        if not self.address:
            return False
        address = self.address
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=draining requests")


def _one_line(text: str) -> str:
    # Fields are newline-separated: a newline in a status (a path from the config)
    # would smuggle in a field of its own (MAINPID=, WATCHDOG=...).
    return " ".join(text.splitlines())
