"""Leases: which daemon instance works which source, kept in MongoDB.

Several instances may share one config and one database. Each runs a keeper
that, every third of the lease time, announces itself, renews the leases it
holds, gives back what exceeds its share and takes free sources up to it.
The share is ceil(sources / live instances), capped by ``daemon.max_sources``.
An instance that dies stops renewing: its leases expire and the others take
its sources over, resuming from the checkpoints in MongoDB.

A worker syncs only while ``holds(source)`` says its lease is live by the
local clock, so a stalled instance stops writing before another may start.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import time
from datetime import timedelta
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def default_owner() -> str:
    """hostname/pid: unique while the process lives, readable in `commsync status`."""
    return f"{socket.gethostname()}/{os.getpid()}"


class LeaseKeeper:
    """Takes, renews and gives back this instance's source leases."""

    def __init__(self, store: Any, *, owner: str | None = None, ttl: timedelta = timedelta(seconds=60), max_sources: int | None = None):
        self.store = store
        self.owner = owner or default_owner()
        self.ttl = ttl
        self.max_sources = max_sources
        self.live_instances = 1
        self.healthy = True
        self._wanted: dict[str, None] = {}  # an ordered set
        self._held: dict[str, float] = {}  # source -> local (monotonic) expiry
        self._yielding: set[str] = set()
        self._grant: dict[str, asyncio.Event] = {}
        self._revoke: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def period(self) -> float:
        return self.ttl.total_seconds() / 3

    @property
    def held(self) -> list[str]:
        return [n for n in self._held if self.holds(n)]

    # -- what workers use --------------------------------------------------------

    def want(self, source: str) -> None:
        """Compete for ``source`` from the next tick on (which comes at once)."""
        self._wanted[source] = None
        self._grant.setdefault(source, asyncio.Event())
        self._revoke.setdefault(source, asyncio.Event())
        self._wake.set()

    def granted(self, source: str) -> asyncio.Event:
        """Set while this instance holds ``source``."""
        return self._grant[source]

    def revoked(self, source: str) -> asyncio.Event:
        """Set when the worker must stop after its batch in hand and give the lease back."""
        return self._revoke[source]

    def holds(self, source: str) -> bool:
        """True while the lease on ``source`` is ours and unexpired by our own clock."""
        deadline = self._held.get(source)
        return deadline is not None and deadline > time.monotonic()

    async def give_back(self, source: str) -> None:
        """Release ``source`` (its worker is idle now) so that any instance may take it."""
        async with self._lock:
            self._held.pop(source, None)
            self._yielding.discard(source)
            if source in self._grant:
                self._grant[source].clear()
                self._revoke[source].clear()
            try:
                await self.store.release_leases([source], self.owner)
            except Exception as exc:
                # It expires on its own then.
                log.warning("lease_release_failed", source=source, error=_describe(exc))
        log.info("lease_released", source=source, owner=self.owner)

    async def unwant(self, source: str) -> None:
        """Stop competing for ``source`` (removed from the config)."""
        # Under the lock: a tick in flight must not take a lease nobody will work.
        async with self._lock:
            self._wanted.pop(source, None)
            held = source in self._held
        if held:
            await self.give_back(source)
        async with self._lock:
            if source not in self._wanted:
                self._grant.pop(source, None)
                self._revoke.pop(source, None)

    # -- the keeper loop ----------------------------------------------------------

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.tick()
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.healthy = False
                log.warning("lease_tick_failed", owner=self.owner, error=_describe(exc))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.period)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """Announce, renew, give back the excess, take up to our share."""
        async with self._lock:
            await self._tick()

    async def _tick(self) -> None:
        ttl_s = self.ttl.total_seconds()
        started = time.monotonic()
        self.live_instances = max(1, await self.store.heartbeat(self.owner, self.ttl, {"pid": os.getpid(), "host": socket.gethostname(), "sources": len(self._held)}))
        if self._held:
            kept = await self.store.renew_leases(list(self._held), self.owner, self.ttl)
            for source in list(self._held):
                if source in kept and self._held[source] > started:
                    self._held[source] = started + ttl_s
                else:
                    # Taken over, or expired here while this instance stalled: stop
                    # writing now; the worker gives it back and competes again.
                    self._held[source] = 0.0
                    self._revoke_source(source, "lease_lost")

        share = math.ceil(len(self._wanted) / self.live_instances)
        if self.max_sources is not None:
            share = min(share, self.max_sources)
        active = [s for s in self._held if s not in self._yielding and self.holds(s)]
        if len(active) > share:
            # The newest first: long-held sources stay where their connections are warm.
            for source in active[share:]:
                self._yielding.add(source)
                self._revoke_source(source, "lease_yielding", share=share, instances=self.live_instances)
            return
        room = share - len(active)
        candidates = [s for s in self._wanted if s not in self._held]
        if room <= 0 or not candidates:
            return
        free = list(await self.store.free_sources(candidates, self.owner))
        # Instances starting together should not all reach for the same sources.
        random.shuffle(free)
        for source in free[:room]:
            taken = time.monotonic()
            if await self.store.acquire_lease(source, self.owner, self.ttl):
                self._held[source] = taken + ttl_s
                self._revoke[source].clear()
                self._grant[source].set()
                log.info("lease_acquired", source=source, owner=self.owner, share=share, instances=self.live_instances)

    def _revoke_source(self, source: str, event: str, **fields: Any) -> None:
        if source in self._revoke and not self._revoke[source].is_set():
            emit = log.warning if event == "lease_lost" else log.info
            emit(event, source=source, owner=self.owner, **fields)
            self._revoke[source].set()

    async def release_all(self) -> None:
        """On a clean stop: give every lease back and leave the instance list."""
        async with self._lock:
            held, self._held = list(self._held), {}
            try:
                await self.store.release_leases(held, self.owner)
                await self.store.retire_instance(self.owner)
            except Exception as exc:
                log.warning("lease_release_failed", owner=self.owner, error=_describe(exc))
        if held:
            log.info("leases_released", owner=self.owner, sources=len(held))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
