"""systemd's sd_notify protocol: READY, STATUS, WATCHDOG, STOPPING.

A few lines over a unix datagram socket, as sd_notify(3) describes it:
``$NOTIFY_SOCKET`` names a filesystem path or, starting with ``@``, an
abstract-namespace address. Without it (not under systemd) every call is a
no-op, so the daemon runs the same from a shell.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

from .text import describe

log = structlog.get_logger(__name__)


def _address(value: str) -> str | bytes:
    # "@name" is the abstract namespace: a leading NUL byte instead of the "@".
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        socket_name = env.get("NOTIFY_SOCKET", "")
        self.address = _address(socket_name) if socket_name else None
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when nobody listens."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            # A lost notification must never take the daemon down.
            log.warning("sd_notify_failed", error=describe(exc))
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        # One line: systemctl shows STATUS= as is.
        return self.send("STATUS=" + " ".join(text.split()))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog_loop(self) -> None:
        """Ping at half the watchdog interval from the event loop, until cancelled.

        The pings come from the loop itself, so a blocked loop stops them and
        systemd restarts the service.
        """
        if self.watchdog_interval is None or self.address is None:
            return
        period = self.watchdog_interval / 2
        log.info("watchdog_enabled", interval_s=round(self.watchdog_interval, 3))
        while True:
            self.watchdog()
            await asyncio.sleep(period)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds from ``$WATCHDOG_USEC``, if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
