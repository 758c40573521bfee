"""Scale-out: instances share sources through lease documents in MongoDB."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from structlog.testing import capture_logs

from commsync.connectors.base import Batch
from commsync.daemon.leases import LeaseKeeper
from commsync.daemon.runner import Runner, StoreSink

from eventually import eventually
from records import T0, email_record, hours

TTL = timedelta(seconds=1)
FAST = timedelta(milliseconds=50)


class Tracker:
    """Who syncs what, and whether two ever sync one source at once."""

    def __init__(self):
        self.active: dict[str, str] = {}
        self.overlaps: list[tuple[str, str, str]] = []
        self.synced: dict[str, set[str]] = {}

    def enter(self, source, owner):
        if source in self.active:
            self.overlaps.append((source, self.active[source], owner))
        self.active[source] = owner
        self.synced.setdefault(owner, set()).add(source)

    def leave(self, source, owner):
        if self.active.get(source) == owner:
            del self.active[source]


class Endless:
    """A source that always has two more batches, resuming after its checkpoint."""

    kind = "test"

    def __init__(self, name, owner, tracker):
        self.name, self.owner, self.tracker = name, owner, tracker

    async def batches(self, state):
        done = state.get("s", {}).get("n", 0)
        self.tracker.enter(self.name, self.owner)
        try:
            for i in range(done, done + 2):
                await asyncio.sleep(0.01)  # a slow remote widens any window for overlap
                yield Batch("s", [email_record(f"{self.name}-{i}@x", at=T0 + hours(i), source=self.name, uid=i)], {"n": i + 1})
        finally:
            self.tracker.leave(self.name, self.owner)

    async def check(self):
        return "ok"

    async def aclose(self):
        return None


def instance(store, owner, tracker, n=4, ttl=TTL, max_sources=None):
    keeper = LeaseKeeper(store, owner=owner, ttl=ttl, max_sources=max_sources)
    runner = Runner([Endless(f"s{i}", owner, tracker) for i in range(n)], StoreSink(store), poll_interval=FAST, leases=keeper)
    return runner, keeper


async def leases_of(store, owner):
    return {d["_id"] for d in await store.db["leases"].find({"owner": owner}).to_list(None)}


async def stop_all(*pairs):
    for runner, _ in pairs:
        runner.stop()
    for _, task in pairs:
        if not task.done():
            await asyncio.wait_for(task, 10)


async def test_lease_documents_are_exclusive(store):
    assert await store.acquire_lease("s", "a", TTL)
    assert not await store.acquire_lease("s", "b", TTL)
    assert await store.acquire_lease("s", "a", TTL)  # ours already: renewed
    assert await store.renew_leases(["s", "other"], "a", TTL) == {"s"}
    owners = await store.lease_owners(["s", "t"])
    assert set(owners) == {"s"} and owners["s"]["owner"] == "a" and owners["s"]["live"]
    # An expired lease is anyone's; once taken, the old owner cannot renew it.
    assert await store.acquire_lease("x", "a", -TTL)
    assert not (await store.lease_owners(["x"]))["x"]["live"]
    assert await store.acquire_lease("x", "b", TTL)
    assert await store.renew_leases(["x"], "a", TTL) == set()
    await store.release_leases(["x"], "a")  # not a's: untouched
    assert await leases_of(store, "b") == {"x"}
    await store.release_leases(["x"], "b")
    assert await store.acquire_lease("x", "c", TTL)


async def test_two_instances_split_the_sources_and_never_overlap(store):
    tracker = Tracker()
    (ra, ka), (rb, kb) = instance(store, "a", tracker), instance(store, "b", tracker)
    ta, tb = asyncio.create_task(ra.run()), asyncio.create_task(rb.run())
    try:
        await eventually(lambda: len(ka.held) == 2 and len(kb.held) == 2, what="a 2/2 split")
        assert set(ka.held).isdisjoint(kb.held)
        await eventually(lambda: len(tracker.synced.get("b", ())) == 2 and len(tracker.synced.get("a", ())) >= 2)
        assert await leases_of(store, "a") == set(ka.held) and await leases_of(store, "b") == set(kb.held)
        assert tracker.overlaps == []
    finally:
        await stop_all((ra, ta), (rb, tb))
    assert tracker.overlaps == []
    # A clean stop gives the leases back at once.
    assert await store.db["leases"].count_documents({}) == 0


async def test_a_dead_instance_hands_its_sources_over_after_the_lease_time(store):
    tracker = Tracker()
    (ra, ka), (rb, kb) = instance(store, "a", tracker), instance(store, "b", tracker)
    ta, tb = asyncio.create_task(ra.run()), asyncio.create_task(rb.run())
    try:
        await eventually(lambda: len(ka.held) == 2 and len(kb.held) == 2)
        orphaned = set(ka.held)
        # Die like a killed process: no release, the leases stay until they expire.
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        died = time.monotonic()
        assert await leases_of(store, "a") == orphaned
        expiry = {d["_id"]: d["expires_at"] for d in await store.db["leases"].find({"owner": "a"}).to_list(None)}

        await eventually(lambda: len(kb.held) == 4, what="b takes all four")
        handover = time.monotonic() - died
        # Within the lease time, plus one keeper tick (a third of it) and scheduling slack.
        assert handover < TTL.total_seconds() * 3 + 2, handover
        for doc in await store.db["leases"].find({"_id": {"$in": list(orphaned)}}).to_list(None):
            assert doc["owner"] == "b"
            assert doc["acquired_at"] >= expiry[doc["_id"]]  # not one moment before a's lease ran out
        # b resumes from a's checkpoints: no record is missing or doubled.
        await eventually(lambda: all(s in tracker.synced["b"] for s in orphaned))
        await eventually(lambda: _all_checkpointed(store, orphaned), what="b stored and checkpointed each of them")
    finally:
        await stop_all((rb, tb))
    assert tracker.overlaps == []
    for source in orphaned:
        state = await store.load_state(source)
        # b may be stopped before its first batch of a source a never checkpointed: then no checkpoint at all.
        assert await store.records.count_documents({"sources.source": source}) == state.get("s", {}).get("n", 0)


async def _all_checkpointed(store, sources):
    for source in sources:
        if "s" not in await store.load_state(source):
            return False
    return True


async def test_max_sources_caps_one_instance(store):
    tracker = Tracker()
    runner, keeper = instance(store, "a", tracker, n=5, max_sources=2)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: len(keeper.held) == 2)
        await eventually(lambda: len(tracker.synced.get("a", ())) == 2)
        await asyncio.sleep(TTL.total_seconds())  # a few more keeper ticks
        assert len(keeper.held) == 2 and tracker.synced["a"] == set(keeper.held)
        assert {s for s, st in runner.status.items() if st.state == "waiting for lease"} == {f"s{i}" for i in range(5)} - set(keeper.held)
    finally:
        await stop_all((runner, task))


async def test_a_clean_stop_hands_over_without_waiting_for_expiry(store):
    tracker = Tracker()
    slow = timedelta(seconds=30)
    (ra, ka), (rb, kb) = instance(store, "a", tracker, ttl=slow), instance(store, "b", tracker, ttl=slow, max_sources=4)
    ta = asyncio.create_task(ra.run())
    await eventually(lambda: len(ka.held) == 4)
    tb = asyncio.create_task(rb.run())
    await eventually(lambda: kb.live_instances == 2)
    ra.stop()
    assert await asyncio.wait_for(ta, 10) is True
    # b's next tick (a third of 30 s at most) finds them free: far less than the lease time.
    kb._wake.set()
    try:
        await eventually(lambda: len(kb.held) == 4, timeout=12)
    finally:
        await stop_all((rb, tb))
    assert tracker.overlaps == []


async def test_source_status_documents_are_kept(store):
    tracker = Tracker()
    runner, keeper = instance(store, "a", tracker, n=2)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: store.db["source_status"].count_documents({"last_success": {"$exists": True}}), what="status saved")
        await eventually(lambda: _two_docs(store))
    finally:
        await stop_all((runner, task))
    doc = await store.db["source_status"].find_one({"_id": "s0"})
    assert doc["owner"] == "a" and doc["kind"] == "test" and doc["consecutive_failures"] == 0
    # This kind of source does not report a backlog: unknown, not zero.
    assert doc["backlog"] is None and doc["last_success"] is not None


async def _two_docs(store):
    return await store.db["source_status"].count_documents({"last_success": {"$exists": True}}) == 2


async def test_instances_with_different_source_lists_leave_no_source_unworked(store):
    """a serves s0..s2, b serves s2..s4: shares are counted over the instances that can work each source."""
    tracker = Tracker()
    ka = LeaseKeeper(store, owner="a", ttl=TTL)
    kb = LeaseKeeper(store, owner="b", ttl=TTL)
    ra = Runner([Endless(f"s{i}", "a", tracker) for i in (0, 1, 2)], StoreSink(store), poll_interval=FAST, leases=ka)
    rb = Runner([Endless(f"s{i}", "b", tracker) for i in (2, 3, 4)], StoreSink(store), poll_interval=FAST, leases=kb)
    ta, tb = asyncio.create_task(ra.run()), asyncio.create_task(rb.run())
    try:
        await eventually(lambda: set(ka.held) | set(kb.held) == {f"s{i}" for i in range(5)}, what="every source owned")
        assert {"s0", "s1"} <= set(ka.held) and {"s3", "s4"} <= set(kb.held)  # the only instance for them takes them
        assert ka.unowned_for() == {} and kb.unowned_for() == {}
    finally:
        await stop_all((ra, ta), (rb, tb))
    assert tracker.overlaps == []


async def test_a_source_nobody_works_is_reported_after_a_lease_time(store):
    """Another instance holds the lease but stopped renewing it long ago, and nobody took it over (max_sources)."""
    keeper = LeaseKeeper(store, owner="a", ttl=TTL, max_sources=1)
    runner = Runner([Endless(f"s{i}", "a", Tracker()) for i in range(2)], StoreSink(store), poll_interval=FAST, leases=keeper)
    with capture_logs() as logs:
        task = asyncio.create_task(runner.run())
        try:
            await eventually(lambda: len(keeper.held) == 1)
            (idle,) = {"s0", "s1"} - set(keeper.held)
            await eventually(
                lambda: any(e["event"] == "source_unowned" and e["source"] == idle for e in logs), timeout=10, what="reported after a lease time"
            )
            assert idle in keeper.unowned_for()
        finally:
            await stop_all((runner, task))


async def test_a_restart_on_the_same_host_takes_its_dead_predecessors_leases_at_once(store):
    """A watchdog kill leaves leases for lease_ttl; the next process on the host sees its predecessor is gone."""
    import socket

    dead = f"{socket.gethostname()}/{2**22 + 12345}"  # beyond pid_max: no such process
    ttl = timedelta(seconds=60)
    for i in range(2):
        assert await store.acquire_lease(f"s{i}", dead, ttl)
    keeper = LeaseKeeper(store, ttl=ttl)
    runner = Runner([Endless(f"s{i}", keeper.owner, Tracker()) for i in range(2)], StoreSink(store), poll_interval=FAST, leases=keeper)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: len(keeper.held) == 2, timeout=5, what="taken over long before the 60 s lease expired")
    finally:
        await stop_all((runner, task))
    # Another live owner on this host (this very process) is never a predecessor.
    assert await store.acquire_lease("x", keeper.owner, ttl)
    other = LeaseKeeper(store, owner=f"{socket.gethostname()}/99999999", ttl=ttl)
    assert not other._free({"owner": keeper.owner, "live": True})


async def test_after_an_outage_the_first_round_takes_back_only_its_own(store):
    """Every heartbeat lapsed during the outage: the first instance back must not grab every source."""
    keeper = LeaseKeeper(store, owner="a", ttl=TTL)
    for s in ("s0", "s1", "s2", "s3"):
        keeper.want(s)
    # s0 and s1 were a's, s2 and s3 b's; all four leases expired while MongoDB was away.
    for s, owner in (("s0", "a"), ("s1", "a"), ("s2", "b"), ("s3", "b")):
        assert await store.acquire_lease(s, owner, -TTL)
    keeper.healthy = False  # the last round failed
    await keeper.tick()
    assert set(keeper.held) == {"s0", "s1"}
    keeper.healthy = True
    await keeper.tick()  # b did not come back: now its sources are anyone's
    assert set(keeper.held) == {"s0", "s1", "s2", "s3"}


class SlowToTake:
    """The store, with each lease taken slowly (a loaded MongoDB, hundreds of sources)."""

    def __init__(self, store, delay):
        self.store, self.delay = store, delay

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def acquire_lease(self, *args, **kwargs):
        await asyncio.sleep(self.delay)
        return await self.store.acquire_lease(*args, **kwargs)


async def test_taking_many_leases_slowly_never_lets_the_first_ones_lapse(store):
    # 12 leases at 0.15 s each outlast a 0.9 s lease: the ones taken first must be renewed
    # meanwhile, or they are lost (and their sources restarted) before the last is taken.
    ttl = timedelta(seconds=0.9)
    keeper = LeaseKeeper(SlowToTake(store, 0.15), owner="a", ttl=ttl)
    sources = [f"s{i}" for i in range(12)]
    for s in sources:
        keeper.want(s)
    with capture_logs() as logs:
        task = asyncio.create_task(keeper.run())
        try:
            await eventually(lambda: len(keeper.held) == len(sources), timeout=10, what="every lease taken")
            await asyncio.sleep(ttl.total_seconds())  # past the first leases' original expiry
            assert set(keeper.held) == set(sources)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert [e for e in logs if e["event"] == "lease_lost"] == []
    assert not any(keeper.revoked(s).is_set() for s in sources)
    assert await leases_of(store, "a") == set(sources)


async def test_a_revoked_lease_is_never_renewed(store, monkeypatch):
    """A lease this instance must give back is not kept alive for a worker that does not give it back."""
    renewed: list[list[str]] = []
    renew = store.renew_leases

    async def spy(sources, owner, ttl):
        renewed.append(sorted(sources))
        return await renew(sources, owner, ttl)

    monkeypatch.setattr(store, "renew_leases", spy)
    a = LeaseKeeper(store, owner="a", ttl=TTL)
    a.want("s")
    await a.tick()
    assert a.holds("s")
    a.max_sources = 0  # a rebalance: the share drops below what is held
    await a.tick()
    assert a.revoked("s").is_set() and renewed == [["s"]]
    await a.tick()
    await a.tick()
    assert renewed == [["s"]]  # not renewed while revoked
    # Never given back (a worker stuck, or parked): it lapses, and another instance takes it.
    b = LeaseKeeper(store, owner="b", ttl=TTL)
    b.want("s")

    async def b_holds():
        await b.tick()
        return b.holds("s")

    await eventually(b_holds, what="the lapsed lease taken by another instance")
    assert not a.holds("s")
