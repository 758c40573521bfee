"""Round trips counted where they happen: a pymongo command listener on the client."""

from __future__ import annotations

import threading

from pymongo import monitoring


class CommandCounter(monitoring.CommandListener):
    """Counts the commands a client sends (tests and benchmarks read `count`).

    Every command is one round trip to the server; getMore of a long cursor is
    one more, as it should be. The driver's own handshakes (hello, endSessions)
    are not the store's doing and are left out.
    """

    IGNORED = frozenset({"hello", "ismaster", "isMaster", "endSessions", "ping", "saslStart", "saslContinue"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in self.IGNORED:
            return
        with self._lock:
            self.count += 1
            self.names.append(event.command_name)
            if len(self.names) > 10_000:
                del self.names[:5_000]

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        return None

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return None
