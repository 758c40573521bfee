"""Leases: which daemon instance works which source, kept in MongoDB.

Several instances may share one database, with the same config or different
ones. Each runs a keeper that, every third of the lease time, announces itself
(with the sources it is configured for), renews the leases it holds, gives
back what exceeds its share and takes free sources up to it. A source's
share is split between the live instances configured for it: an instance's
share is the sum over its sources of 1 / (instances that can work it),
rounded up, capped by ``daemon.max_sources``; sources fewer instances can work
are taken first. An instance that dies stops renewing: its leases expire and
the others take its sources over, resuming from the checkpoints in MongoDB.
A restarted instance on the same host takes over the leases of its dead
predecessor at once (its process is gone), without waiting for them to expire.

A worker syncs only while ``holds(source)`` says its lease is live by the
local clock, so a stalled instance stops writing before another may start.
A configured source nobody has held for longer than a lease is reported
(`source_unowned`, `commsync status`, the metrics).
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

from .text import describe

log = structlog.get_logger(__name__)


def default_owner() -> str:
    """hostname/pid: unique while the process lives, readable in `commsync status`."""
    return f"{socket.gethostname()}/{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process (another user): alive
    return True


class LeaseKeeper:
    """Takes, renews and gives back this instance's source leases."""

    def __init__(self, store: Any, *, owner: str | None = None, ttl: timedelta = timedelta(seconds=60), max_sources: int | None = None):
        self.store = store
        self.owner = owner or default_owner()
        self.host = socket.gethostname()
        self.ttl = ttl
        self.max_sources = max_sources
        self.live_instances = 1
        self.healthy = True
        self.share = 0
        # Configured sources that no instance has held since (monotonic time); reported after a lease time.
        self.unowned: dict[str, float] = {}
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

    def unowned_for(self, now: float | None = None) -> dict[str, float]:
        """Configured sources without an owner for longer than a lease: seconds since, by source."""
        now = time.monotonic() if now is None else now
        ttl = self.ttl.total_seconds()
        return {s: now - since for s, since in self.unowned.items() if now - since > ttl}

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
        # Outside the lock: with MongoDB down the release waits its full timeout, and the
        # keeper's ticks (and the other sources' releases) must not queue behind it.
        try:
            await self.store.release_leases([source], self.owner)
        except Exception as exc:
            # It expires on its own then.
            log.warning("lease_release_failed", source=source, error=describe(exc), expires_in_s=self.ttl.total_seconds())
            return
        log.info("lease_released", source=source, owner=self.owner)

    async def unwant(self, source: str) -> None:
        """Stop competing for ``source`` (removed from the config)."""
        # Under the lock: a tick in flight must not take a lease nobody will work.
        async with self._lock:
            self._wanted.pop(source, None)
            self.unowned.pop(source, None)
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
                # What was seen unowned before the database went away says nothing about now.
                self.unowned.clear()
                log.warning("lease_tick_failed", owner=self.owner, error=describe(exc))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.period)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """Announce, renew, give back the excess, take up to our share."""
        async with self._lock:
            await self._tick(settling=not self.healthy)

    async def _tick(self, settling: bool = False) -> None:
        """One round. ``settling``: the first after the database was unreachable, when every
        instance's heartbeat has lapsed; it takes back only what was ours, and leaves the
        rest for the next round, when the others have announced themselves again."""
        ttl_s = self.ttl.total_seconds()
        started = time.monotonic()
        info = {"pid": os.getpid(), "host": self.host, "sources": len(self._held), "sources_configured": list(self._wanted)}
        instances = await self.store.heartbeat(self.owner, self.ttl, info)
        self.live_instances = max(1, len(instances))
        # A lease revoked here (lost, or being yielded) is never renewed: its worker gives it
        # back after the batch in hand, and if it does not, it lapses for another instance.
        renewable = [s for s in self._held if not self._is_revoked(s)]
        if renewable:
            kept = await self.store.renew_leases(renewable, self.owner, self.ttl)
            for source in renewable:
                if source in kept and self._held[source] > started:
                    self._held[source] = started + ttl_s
                else:
                    # Taken over, or expired here while this instance stalled: stop
                    # writing now; the worker gives it back and competes again.
                    self._held[source] = 0.0
                    self._revoke_source(source, "lease_lost")

        eligible = _eligible(self._wanted, instances, self.owner)
        share = math.ceil(sum(1 / eligible[s] for s in self._wanted) - 1e-9)
        if self.max_sources is not None:
            share = min(share, self.max_sources)
        self.share = share
        active = [s for s in self._held if s not in self._yielding and self.holds(s)]
        candidates = [s for s in self._wanted if s not in self._held]
        free: set[str] = set()
        if candidates:
            owners = await self.store.lease_owners(candidates)
            free = {s for s in candidates if self._free(owners.get(s))}
            self._track_unowned(candidates, owners)
        else:
            self.unowned.clear()
        if len(active) > share:
            # The newest first: long-held sources stay where their connections are warm.
            for source in active[share:]:
                self._yielding.add(source)
                self._revoke_source(source, "lease_yielding", share=share, instances=self.live_instances)
            return
        room = share - len(active)
        if settling:
            free = {s for s in free if (owners.get(s) or {}).get("owner") == self.owner}
        if room <= 0 or not free:
            return
        # Sources fewer instances can work first; then the ones whose (expired) lease was ours,
        # so that after an outage each instance takes back its own instead of swapping; among
        # equals, at random, so that instances starting together do not all reach for the same ones.
        order = sorted(free, key=lambda s: (eligible[s], (owners.get(s) or {}).get("owner") != self.owner, random.random()))
        for source in order[:room]:
            taken = time.monotonic()
            if taken - started > self.period:
                # Hundreds of leases taken one by one from a loaded database can outlast the
                # ones taken first: renew those (the next round, at once) before taking more.
                self._wake.set()
                break
            lease = owners.get(source)
            # Taken from its owner by name only when live, i.e. our dead predecessor's: an expired
            # lease is taken by its expiry alone, since its owner may have just taken it back.
            predecessor = lease["owner"] if lease and lease.get("live") and lease["owner"] != self.owner else None
            if await self.store.acquire_lease(source, self.owner, self.ttl, predecessor=predecessor):
                self._held[source] = taken + ttl_s
                self.unowned.pop(source, None)
                self._revoke[source].clear()
                self._grant[source].set()
                log.info(
                    "lease_acquired",
                    source=source,
                    owner=self.owner,
                    share=share,
                    instances=self.live_instances,
                    **({"from_predecessor": predecessor} if predecessor else {}),
                )

    def _free(self, lease: dict[str, Any] | None) -> bool:
        """A source is free when nobody holds a live lease, or its holder is our dead predecessor on this host."""
        if lease is None or not lease.get("live"):
            return True
        if lease["owner"] == self.owner:
            return True
        host, _, pid = str(lease["owner"]).rpartition("/")
        # A restart on the same host (a watchdog kill, a crash): the old process is gone, so its leases are ours to take now.
        return host == self.host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))

    def _track_unowned(self, candidates: list[str], owners: dict[str, dict[str, Any]]) -> None:
        now = time.monotonic()
        for source in candidates:
            lease = owners.get(source)
            if lease is not None and lease.get("live"):
                self.unowned.pop(source, None)
            elif source not in self.unowned:
                self.unowned[source] = now
        late = self.unowned_for(now)
        for source, seconds in late.items():
            log.warning("source_unowned", source=source, seconds=round(seconds), detail="no instance has worked it for longer than a lease")

    def _is_revoked(self, source: str) -> bool:
        event = self._revoke.get(source)
        return event is not None and event.is_set()

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
                # Not released: they expire on their own (and a successor on this host takes them at once).
                log.warning("leases_not_released", owner=self.owner, sources=len(held), error=describe(exc), expire_in_s=self.ttl.total_seconds())
                return
        if held:
            log.info("leases_released", owner=self.owner, sources=len(held))


def _eligible(wanted: dict[str, None], instances: list[dict[str, Any]], me: str) -> dict[str, int]:
    """How many live instances can work each of our sources (we can, even before our heartbeat is read)."""
    counts = dict.fromkeys(wanted, 1)
    for inst in instances:
        if inst["_id"] == me:
            continue
        configured = inst.get("sources_configured")
        if configured is None:
            # An older instance that does not say what it serves: assume it serves what we do.
            configured = list(wanted)
        for source in configured:
            if source in counts:
                counts[source] += 1
    return counts
