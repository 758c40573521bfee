"""Config reload (SIGHUP): the running sources follow the YAML file.

Added sources start, removed ones stop cleanly (the batch in hand is stored
and checkpointed), changed ones restart. A file that does not load is
logged and the running configuration stays. Keys the running process cannot
change (MongoDB, the HTTP listener, parse workers, leases) are logged as
needing a restart and keep their running values.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog

from commsync.config import ConfigError, Settings, load_settings
from commsync.connectors import registry
from commsync.connectors.mailpool import ParsePool

from . import app, logs

log = structlog.get_logger(__name__)

# Keys no connector is built from (besides the source lists): changing them restarts no source.
_NOT_SHARED = {"daemon", "log_level", "mongodb", "customers", "blocklist", "capture_automated", "retention", "rematch"}
_RESTART_KEYS = ("mongodb", "customers", "default_region", "retention", "rematch")
_RESTART_ONLY = ("parse_workers", "max_sources", "lease_ttl", "instance", "http", "shutdown_timeout", "verify_every")


class Supervisor:
    """Keeps the runner's sources in line with the config file."""

    def __init__(self, path: str | Path, settings: Settings, runner: Any, pool: ParsePool | None):
        self.path = Path(path)
        self.settings = settings
        self.runner = runner
        self.pool = pool
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Hand every configured source to the runner."""
        for connector in app.build_connectors(self.settings, self.pool):
            self.runner.add(connector, interval=_interval(self.settings, connector.name))

    async def reload(self) -> bool:
        """Re-read the file and apply it; False (and nothing changed) when it is invalid."""
        async with self._lock:
            try:
                new = await asyncio.to_thread(load_settings, self.path)
            except ConfigError as exc:
                log.error("reload_failed", config=str(self.path), error=str(exc), kept="the running configuration")
                return False
            try:
                await self.apply(new)
            except Exception:
                # Sources the failed apply stopped come back with the next reload or restart.
                log.exception("reload_failed", config=str(self.path), kept="partly applied; see the error")
                return False
            return True

    async def apply(self, new: Settings) -> None:
        old = self.settings
        # Read once at start (the store's matching, the upkeep loop, the listener...): they keep
        # their running values everywhere, connectors included, until a restart.
        restart = [k for k in _RESTART_KEYS if getattr(old, k) != getattr(new, k)]
        restart += [f"daemon.{k}" for k in _RESTART_ONLY if getattr(old.daemon, k) != getattr(new.daemon, k)]
        if restart:
            log.warning("reload_needs_restart", keys=restart, detail="these keep their running values until a restart")
        new = new.model_copy(
            update={
                **{k: getattr(old, k) for k in _RESTART_KEYS},
                "daemon": new.daemon.model_copy(update={k: getattr(old.daemon, k) for k in _RESTART_ONLY}),
            }
        )
        before, after = _fingerprints(old), _fingerprints(new)
        removed = [n for n in before if n not in after]
        added = [n for n in after if n not in before]
        changed = [n for n in after if n in before and after[n] != before[n]]

        if new.log_level != old.log_level:
            logs.configure(new.log_level)
        store = getattr(self.runner.sink, "store", None)
        if store is not None:
            # Blocklist, automated mail, capture.policy: the next batch follows the new file.
            store.capture = app.capture_policy(new)
        self.runner.policy = app.retry_policy(new)
        self.runner.poll_interval = new.daemon.poll_interval

        await asyncio.gather(*(self.runner.remove(name) for name in removed + changed))
        wanted = set(added + changed)
        subset = new.model_copy(
            update={k.settings_key: [s for s in getattr(new, k.settings_key) if s.name in wanted] for k in registry.kinds()}
        )
        for connector in app.build_connectors(subset, self.pool):
            self.runner.add(connector, interval=_interval(new, connector.name))
        self.settings = new
        if not after:
            log.warning("no_sources", detail="the config lists no sources; the daemon idles until a reload adds some")
        log.info("reloaded", config=str(self.path), added=added, removed=removed, restarted=changed, sources=len(after))


def _fingerprints(settings: Settings) -> dict[str, Any]:
    """Per source: everything its connector is built from (secrets compare by value)."""
    shared = settings.model_dump(exclude=_NOT_SHARED | {k.settings_key for k in registry.kinds()})
    return {s.name: (s.model_dump(), _interval(settings, s.name), shared) for s in settings.sources()}


def _interval(settings: Settings, name: str) -> Any:
    for source in settings.sources():
        if source.name == name:
            return getattr(source, "poll_interval", None) or settings.daemon.poll_interval
    return settings.daemon.poll_interval
