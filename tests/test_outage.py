"""A MongoDB outage under running daemons: a real server stopped for 16 s while mail streams in.

Two daemons (`commsync run`, the console script) share four mailboxes. They
must keep running, say on /healthz why they are unhealthy, back off without
spinning or flooding their logs, never move a checkpoint past mail that is not
stored, never both work one source when the server is back, and in the end
store every message exactly once with histories equal to a rebuild.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
import uuid
from datetime import datetime, timedelta
from types import SimpleNamespace

import pymongo.errors
import pytest

from commsync.connectors.base import Batch
from commsync.daemon.http import HttpEndpoint, mongo_problem
from commsync.daemon.leases import LeaseKeeper
from commsync.daemon.metrics import Metrics
from commsync.daemon.retry import RetryPolicy
from commsync.daemon.runner import Runner, StoreSink
from commsync.daemon.store import Store

from daemons import Database, MailStream, commsync, foreign_checkpoints, free_port, start_instances, wait_until
from eventually import eventually
from mongo_server import EXTERNAL_URI, MongoTestServer, server_binary
from records import T0, email_record, hours

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(EXTERNAL_URI is not None, reason="stops and restarts the server: needs one the tests own, not COMMSYNC_TEST_MONGODB_URI"),
    pytest.mark.skipif(server_binary() is None, reason="secantusd-py not installed (pip install -e '.[test]')"),
]

OUTAGE_S = 16
PING_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server():
    """A MongoDB server of this module's own, so a test can stop it."""
    with MongoTestServer() as s:
        yield s


async def test_healthz_names_why_mongodb_is_unreachable_within_its_ping_timeout():
    # The configured server selection timeout (10 s) is far above /healthz's ping timeout:
    # the answer still comes within the ping timeout, and says what the driver found.
    port = free_port()  # nothing listens there
    store = Store.connect(f"mongodb://127.0.0.1:{port}/?directConnection=true", "commsync_test", timeout_ms=10_000)
    runner = Runner([], StoreSink(store))
    http = HttpEndpoint(runner, store, Metrics(), ping_timeout=1.0)
    try:
        started = time.monotonic()
        ok, body = await http.health()
        took = time.monotonic() - started
    finally:
        store.close()
    assert not ok and took < 5, (took, body)  # far below the 10 s selection timeout, with room for a loaded machine
    assert body["mongodb"].startswith(f"unreachable: ServerSelectionTimeoutError: 127.0.0.1:{port}: "), body
    assert "Connection refused" in body["mongodb"] and "Topology" not in body["mongodb"], body


def test_healthz_reason_of_a_bare_timeout_and_of_a_refusal():
    assert mongo_problem(TimeoutError(), 2.0) == "unreachable: no answer within 2s"

    class OperationFailure(Exception):
        pass

    assert mongo_problem(OperationFailure("command ping requires authentication"), 2.0) == (
        "error: OperationFailure: command ping requires authentication"
    )


class _Interleaved:
    """The store as instance a sees it: ``between`` runs after a reads the lease owners, before a acts."""

    def __init__(self, store, between):
        self._store, self._between = store, between

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def lease_owners(self, sources):
        seen = await self._store.lease_owners(sources)
        await self._between()
        return seen


async def test_after_an_outage_an_instance_never_takes_a_lease_its_owner_just_took_back(store):
    # b held s; during an outage the lease ran out. When MongoDB is back both instances
    # tick at once: a reads "s: b's, expired", then b takes its own lease back, then a
    # acts on what it read. a must not take the live lease from b: both would work s.
    ttl = timedelta(seconds=30)
    b = LeaseKeeper(store, owner="b", ttl=ttl)
    a = LeaseKeeper(_Interleaved(store, b.tick), owner="a", ttl=ttl)
    a.want("s")
    b.want("s")
    assert await store.acquire_lease("s", "b", -ttl)  # b's lease, expired during the outage
    await a.tick()
    assert b.holds("s")
    owner = (await store.lease_owners(["s"]))["s"]["owner"]
    assert owner == "b" and not a.holds("s"), f"a holds s: {a.holds('s')}, b holds s: {b.holds('s')}, the lease names {owner}"


async def test_after_an_outage_each_instance_takes_back_its_own_sources_first(store):
    # Every lease ran out during the outage. With two instances and four sources, a's share
    # is two: it takes back the two it worked before (its connections, its in-memory status)
    # rather than two at random, which would hand sources back and forth between instances.
    ttl = timedelta(seconds=30)
    sources = [f"s{i}" for i in range(4)]
    for attempt in range(8):
        await store.db["leases"].delete_many({})
        for source, owner in zip(sources, "aabb", strict=True):
            assert await store.acquire_lease(source, owner, -ttl)  # expired
        await store.heartbeat("b", ttl, {"sources_configured": sources})
        a = LeaseKeeper(store, owner="a", ttl=ttl)
        for source in sources:
            a.want(source)
        await a.tick()
        assert sorted(a.held) == ["s0", "s1"], f"attempt {attempt}: a took {sorted(a.held)}"


class Outage:
    """A store that MongoDB's outage makes fail: every coroutine method raises while ``down``."""

    def __init__(self, store):
        self._store, self.down = store, False

    def __getattr__(self, name):
        target = getattr(self._store, name)
        if not inspect.iscoroutinefunction(target):
            return target

        async def call(*args, **kwargs):
            if self.down:
                raise pymongo.errors.ServerSelectionTimeoutError("127.0.0.1:27017: [Errno 111] Connection refused")
            return await target(*args, **kwargs)

        return call


class Trickle:
    """A source with one new item at every pass."""

    kind = "test"

    def __init__(self, name):
        self.name = name

    async def batches(self, state):
        n = state.get("s", {}).get("n", 0)
        yield Batch("s", [email_record(f"{self.name}-{n}@x", at=T0 + hours(n), source=self.name, uid=n)], {"n": n + 1})

    async def check(self):
        return "ok"

    async def aclose(self):
        return None


QUICK = RetryPolicy(backoff_max=timedelta(milliseconds=50))


async def test_a_failure_mongodb_kept_from_being_saved_is_in_the_status_after_recovery(memory_store):
    store = Outage(memory_store)
    runner = Runner([Trickle("s")], StoreSink(store), poll_interval=timedelta(milliseconds=50), policy=QUICK, publish_status=True)
    store.down = True
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["s"].failures >= 2, what="failing passes while MongoDB is down")
        assert await memory_store.source_status("s") is None  # nothing could be saved
        store.down = False
        await eventually(lambda: runner.status["s"].failures == 0, what="a pass after recovery")
        await eventually(lambda: _saved_after_recovery(memory_store), what="the status saved after recovery")
    finally:
        runner.stop()
        await asyncio.wait_for(task, 10)
    doc = await memory_store.source_status("s")
    assert doc["consecutive_failures"] == 0 and doc["last_success"] > doc["last_error_at"], doc
    assert doc["last_error"].startswith("ServerSelectionTimeoutError: 127.0.0.1:27017"), doc


async def _saved_after_recovery(store):
    doc = await store.source_status("s")
    return doc is not None and doc.get("consecutive_failures") == 0 and doc.get("last_success") is not None


async def test_a_failure_is_in_the_status_even_when_the_source_changed_hands_during_the_outage(memory_store):
    # a works s; MongoDB goes away for a (its keeper and its sink); s fails there and the
    # failure cannot be saved; a's lease runs out and b takes s. Once MongoDB is back for
    # a too, `commsync status` should still show what happened to s during the outage.
    ttl = timedelta(seconds=1)
    seen_by_a = Outage(memory_store)
    ka = LeaseKeeper(seen_by_a, owner="a", ttl=ttl)
    ra = Runner([Trickle("s")], StoreSink(seen_by_a), poll_interval=timedelta(milliseconds=50), policy=QUICK, leases=ka)
    kb = LeaseKeeper(memory_store, owner="b", ttl=ttl)
    rb = Runner([Trickle("s")], StoreSink(memory_store), poll_interval=timedelta(milliseconds=50), policy=QUICK, leases=kb)
    ta = asyncio.create_task(ra.run())
    tb = None
    try:
        await eventually(lambda: ra.status["s"].passes >= 1, what="a works s")
        seen_by_a.down = True
        await eventually(lambda: ra.status["s"].failures >= 1, what="s fails on a")
        tb = asyncio.create_task(rb.run())
        await eventually(lambda: kb.holds("s") and rb.status["s"].passes >= 1, what="b took s over")
        seen_by_a.down = False
        await eventually(lambda: ka.healthy and not ka.holds("s"), what="a reaches MongoDB again")
        await eventually(lambda: _error_recorded(memory_store), timeout=3, what="s's outage failure in its status document")
    finally:
        ra.stop()
        rb.stop()
        await asyncio.wait_for(asyncio.gather(*(t for t in (ta, tb) if t is not None)), 10)


async def _error_recorded(store):
    doc = await store.source_status("s") or {}
    return "ServerSelectionTimeoutError" in (doc.get("last_error") or "")


def test_mongodb_up_follows_the_lease_keeper_and_is_absent_without_one():
    metrics = Metrics()
    runner = SimpleNamespace(status={}, leases=None)
    assert _gauge(metrics.render(runner).decode(), "commsync_mongodb_up") is None  # no keeper, no claim
    runner.leases = SimpleNamespace(held=[], unowned_for=dict, healthy=False)
    assert _gauge(metrics.render(runner).decode(), "commsync_mongodb_up") == 0
    runner.leases.healthy = True
    assert _gauge(metrics.render(runner).decode(), "commsync_mongodb_up") == 1


def _gauge(text: str, name: str) -> float | None:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def _metric(text: str, name: str, source: str) -> float | None:
    match = re.search(rf'^{name}\{{source="{re.escape(source)}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else None


def test_daemons_ride_out_a_mongodb_outage(server, dovecot, tmp_path):
    db = Database(server.uri, f"outage_{uuid.uuid4().hex[:8]}")
    customers = db.seed_customers(4)
    users = {f"box{i}": dovecot.new_user(f"out{i}-") for i in range(4)}
    mailboxes = [dovecot.mailbox(user, name=name, folders=["INBOX", "Archive"]) for name, user in users.items()]
    daemons = start_instances(["alpha", "beta"], uri=server.uri, database=db.name, mailboxes=mailboxes, workdir=tmp_path, lease_ttl_s=6.0)
    both = list(daemons.values())
    stream = MailStream(dovecot, users, customers)
    violations: list[str] = []

    def stored(appended) -> bool:
        # Read while capture goes on: no checkpoint is ever ahead of the stored mail.
        violations.extend(db.checkpoint_violations(appended))
        return not db.missing(appended)

    def tails() -> str:
        return "\n".join(f"--- {d.name}\n{d.tail()}" for d in both)

    try:
        for d in both:
            wait_until(d.listening, 30, what=lambda: f"the HTTP listeners\n{tails()}")
        wait_until(lambda: set(db.lease_owners().values()) == set(daemons) and len(db.lease_owners()) == len(users), 60, what="both own sources")
        stream.start()
        wait_until(lambda: stream.count() >= 20, 30, what="20 messages appended")
        early = stream.snapshot()
        wait_until(lambda: stored(early), 30, interval=0.3, what=lambda: f"capture under way: missing {db.missing(early)[:5]}\n{tails()}")
        assert all(d.get("/healthz").status == 200 for d in both)

        lines_before = {d.name: len(d.events()) for d in both}
        server.stop()
        outage_started = time.monotonic()
        answers = []
        # The outage lasts OUTAGE_S whatever happens; meanwhile /healthz is asked again and again.
        while time.monotonic() - outage_started < OUTAGE_S:
            assert all(d.alive for d in both), tails()
            answers.extend(d.get("/healthz", timeout=10) for d in both)
        during = {d.name: d.get("/metrics").body for d in both}
        lines_during = {d.name: len(d.events()) - lines_before[d.name] for d in both}
        server.start()
        recovered_at = time.time()

        # /healthz answered every time, quickly, 503, and said MongoDB is unreachable and why.
        assert answers and all(a.status == 503 for a in answers[2:]), [(a.status, a.body) for a in answers]
        assert max(a.seconds for a in answers) < PING_TIMEOUT_S + 1.0, [round(a.seconds, 2) for a in answers]
        reason = answers[-1].json()["mongodb"]
        assert reason.startswith("unreachable: ServerSelectionTimeoutError: ") and "Connection refused" in reason, reason
        # /metrics said MongoDB was down, and every source's failures were visible on its owner's.
        assert all(_gauge(text, "commsync_mongodb_up") == 0 for text in during.values()), during
        for name in users:
            assert max(_metric(text, "commsync_source_consecutive_failures", name) or 0 for text in during.values()) >= 1, during

        for d in both:
            wait_until(lambda d=d: d.get("/healthz").status == 200, 30, what=lambda: f"/healthz healthy again\n{tails()}")
        target = stream.count() + 20
        wait_until(lambda: stream.count() >= target, 30, what="20 more messages appended")
        later = stream.snapshot()
        wait_until(lambda: stored(later), 60, interval=0.3, what=lambda: f"capture catches up: missing {db.missing(later)[:5]}\n{tails()}")
        appended = stream.stop()
        wait_until(lambda: stored(appended), 30, interval=0.3, what=lambda: f"the last mail stored: missing {db.missing(appended)[:5]}\n{tails()}")
        assert all(d.alive for d in both), tails()

        # After recovery: no failure in a row now, a success since, and the outage's error kept
        # where the instance that saw it works the source now (else see the xfail test above).
        status = json.loads(commsync(tmp_path / "alpha.yaml", "status", "--json").stdout)
        rows = {r["source"]: r for r in status["sources"]}
        errors_checked = 0
        for name in users:
            row = rows[name]
            assert row["owner"] in daemons and row["consecutive_failures"] == 0, row
            assert datetime.fromisoformat(row["last_success"]).timestamp() > recovered_at, row
            if daemons[row["owner"]].named("source_failed", source=name):
                assert re.match(r"(ServerSelectionTimeoutError|AutoReconnect|NetworkTimeout): ", row["last_error"] or ""), row
                assert row["last_success"] > row["last_error_at"], row
                errors_checked += 1
        assert errors_checked >= 1, rows  # the outage failed sources where they are worked now
        metrics = {d.name: d.get("/metrics").body for d in both}
        assert all(_gauge(text, "commsync_mongodb_up") == 1 for text in metrics.values()), metrics
        for name in users:
            owner = metrics[rows[name]["owner"]]
            assert _metric(owner, "commsync_source_consecutive_failures", name) == 0, owner
            assert _metric(owner, "commsync_last_success_timestamp_seconds", name) > recovered_at, owner
            assert sum(_metric(text, "commsync_source_errors_total", name) or 0 for text in metrics.values()) >= 1, metrics

        assert [d.stop() for d in both] == [0, 0], tails()
    finally:
        stream.halt()
        for d in both:
            if d.alive:
                d.kill()

    for d in both:
        events = d.events()
        # No spinning and no flood: a bounded number of lines in the outage, one traceback per source's failure run.
        assert lines_during[d.name] < 40 * len(users), f"{d.name}: {lines_during[d.name]} log lines in a {OUTAGE_S}s outage"
        assert not d.named("imap_connection_lost"), d.named("imap_connection_lost")[:3]  # IMAP was never down
        tracebacks = [e for e in events if "exception" in e]
        assert len(tracebacks) <= len(users), [(e["event"], e.get("source")) for e in tracebacks]
        assert all(len(json.dumps(e)) < 2000 for e in events if "exception" not in e), max(events, key=lambda e: len(json.dumps(e)))

    assert not violations, violations[:10]
    assert not db.exactly_once_problems(appended), db.exactly_once_problems(appended)[:10]
    assert not db.history_differences(), db.history_differences()[:5]
    # One instance at a time worked each source, before, during and after the outage.
    assert not foreign_checkpoints(*both), foreign_checkpoints(*both)[:10]
    db.close()
