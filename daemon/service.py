"""`commsync run` as a service: systemd notify and watchdog, signals, reload, leases, HTTP.

READY=1 goes out once the config is loaded and MongoDB answers; WATCHDOG=1
from the event loop at half the watchdog interval; STATUS= says what a human
wants from `systemctl status`. SIGTERM/SIGINT finish the batch in hand and
exit 0; SIGHUP reloads the config.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from commsync.config import Settings

from . import app, maintenance
from .http import HttpEndpoint
from .leases import LeaseKeeper
from .metrics import Metrics
from .notify import Notifier
from .runner import Runner, StoreSink
from .supervisor import Supervisor
from .text import describe
from .upkeep import PassUpkeep

log = structlog.get_logger(__name__)

STATUS_REFRESH_S = 10.0


async def serve(settings: Settings, config_path: str | Path, *, progress: Any = None) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 1 when MongoDB cannot be reached at start.

    ``progress`` (daemon/progress.py) listens to the runner too: first syncs show how far they are.
    """
    notifier = Notifier()
    watchdog = asyncio.create_task(notifier.watchdog_loop(), name="watchdog")
    try:
        with app.parse_pool(settings) as pool:
            store = app.open_store(settings)
            try:
                return await _serve(settings, config_path, notifier, store, pool, progress)
            finally:
                store.close()
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        notifier.close()


async def _serve(settings: Settings, config_path: str | Path, notifier: Notifier, store: Any, pool: Any, progress: Any = None) -> int:
    notifier.status("connecting to MongoDB")
    try:
        await store.ping()
        await store.init_db()
        await store.ensure_lease_indexes()
    except Exception as exc:
        # Restart=on-failure tries again after RestartSec.
        log.error("mongodb_unreachable", error=describe(exc))
        return 1

    daemon = settings.daemon
    metrics = Metrics()
    status_line = StatusLine(notifier)
    leases = LeaseKeeper(store, owner=daemon.instance, ttl=daemon.lease_ttl, max_sources=daemon.max_sources)
    sink = StoreSink(store)
    runner = Runner(
        [],
        sink,
        poll_interval=daemon.poll_interval,
        policy=app.retry_policy(settings),
        leases=leases,
        listeners=[metrics, status_line] + ([progress] if progress is not None else []),
        shutdown_timeout=daemon.shutdown_timeout,
        after_pass=PassUpkeep(store, sink, verify_every=daemon.verify_every),
    )
    status_line.runner = runner
    if progress is not None:
        progress.runner = runner
    supervisor = Supervisor(config_path, settings, runner, pool)
    supervisor.start()

    async def reload() -> None:
        notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            await supervisor.reload()
        finally:
            notifier.ready(status_line.text())

    tasks: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    http = None
    if daemon.http.listen:
        host, _, port = daemon.http.listen.rpartition(":")
        http = HttpEndpoint(runner, store, metrics, host=host.strip("[]"), port=int(port))
        await http.start()

    upkeep = maintenance.start(store, settings)
    running = asyncio.create_task(runner.run(), name="runner")
    refresher = asyncio.create_task(status_line.refresh_every(STATUS_REFRESH_S), name="status")
    log.info("started", sources=len(runner.sources), owner=leases.owner, watchdog=notifier.watchdog_interval is not None)
    notifier.ready(status_line.text())
    try:
        await running
    finally:
        notifier.stopping()
        refresher.cancel()
        await asyncio.gather(refresher, *tasks, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if http is not None:
            await http.close()
        await upkeep.stop()
    log.info("stopped", ok=all(s.last_error is None for s in runner.status.values()))
    return 0


class StatusLine:
    """The one line `systemctl status` shows: sources, last batch, errors."""

    def __init__(self, notifier: Notifier):
        self.notifier = notifier
        self.runner: Any = None
        self.last_batch: str | None = None
        self._sent = 0.0

    def text(self) -> str:
        statuses = list(self.runner.status.values()) if self.runner is not None else []
        held = getattr(getattr(self.runner, "leases", None), "held", None)
        here = f" ({len(held)} here)" if held is not None and len(held) != len(statuses) else ""
        parked = [s for s in statuses if s.state == "parked"]
        refused = [s for s in statuses if s.refusals and s.state != "parked"]
        failing = [s for s in statuses if s.failures and not s.refusals and s.state != "parked"]
        parts = [f"{len(statuses)} sources{here}", f"last batch {self.last_batch or 'none yet'}"]
        if parked:
            parts.append("PARKED: " + ", ".join(f"{s.name} ({s.parked_reason})" for s in parked[:3]))
        if refused:
            parts.append("credentials refused: " + ", ".join(s.name for s in refused[:3]))
        if failing:
            parts.append("failing: " + ", ".join(f"{s.name} ({(s.last_error or '').split(':')[0]})" for s in failing[:3]))
        if not (parked or refused or failing):
            parts.append("no errors")
        return "; ".join(parts)

    def _update(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._sent >= 1.0:
            self._sent = now
            self.notifier.status(self.text())

    async def refresh_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self._update(force=True)

    # runner listener callbacks
    def batch_stored(self, source: str, batch: Any, seconds: float) -> None:
        self.last_batch = f"{datetime.now().astimezone():%H:%M:%S} {source} +{len(batch.records)}"
        self._update()

    def pass_failed(self, status: Any) -> None:
        self._update(force=True)

    def source_parked(self, status: Any) -> None:
        self._update(force=True)

    def source_removed(self, name: str) -> None:
        self._update(force=True)
