"""The systemd notify protocol: READY, WATCHDOG, STOPPING and STATUS over `$NOTIFY_SOCKET`.

Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a Unix datagram socket path, or an abstract
name starting with `@`) and, with `WatchdogSec=`, `WATCHDOG_USEC` (and `WATCHDOG_PID`). The
controller sends `READY=1` once it serves, `WATCHDOG=1` from its event loop at half the
watchdog period (so a stuck loop gets the service restarted), and `STOPPING=1` when it drains.
Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. The protocol is small and stable
(sd_notify(3)), so it is spoken here directly rather than through a C binding.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("metis_async.systemd")


class Notifier:
    """Sends sd_notify messages to the socket named in `environ` (os.environ by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return bool(self.address)

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines (e.g. `"READY=1"`); False when nobody listens or it failed."""
        if not self.address:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as error:
            log.warning("sd_notify_failed", error=str(error))
            return False
        return True

    async def keep_alive(self) -> None:
        """Send `WATCHDOG=1` from the event loop every half watchdog period, until cancelled."""
        if not self.address or self.watchdog_seconds is None:
            return
        interval = self.watchdog_seconds / 2
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog period systemd asks for (None: no watchdog, or it is for another PID)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6
