"""A MongoDB outage under a running daemon: a real server stopped for 15-20 s while mail streams in.

The daemon (`commsync run`, the console script) must keep running, say on
/healthz why it is unhealthy, back off without spinning or flooding its log,
never move a checkpoint past mail it has not stored, and after the server is
back store every message exactly once with histories equal to a rebuild.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import timedelta

import pytest

from commsync.daemon.http import HttpEndpoint, mongo_problem
from commsync.daemon.leases import LeaseKeeper
from commsync.daemon.metrics import Metrics
from commsync.daemon.runner import Runner, StoreSink
from commsync.daemon.store import Store

from daemons import DaemonProcess, Database, MailStream, commsync, free_port, wait_until, write_config
from mongo_server import EXTERNAL_URI, MongoTestServer, server_binary

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
    assert not ok and took < 1.5, (took, body)
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


def _metric(text: str, name: str, source: str) -> float | None:
    match = re.search(rf'^{name}\{{source="{re.escape(source)}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else None


def test_daemon_rides_out_a_mongodb_outage(server, dovecot, tmp_path):
    db = Database(server.uri, f"outage_{uuid.uuid4().hex[:8]}")
    customers = db.seed_customers(4)
    users = {f"box{i}": dovecot.new_user(f"out{i}-") for i in range(3)}
    port = free_port()
    config = write_config(
        tmp_path / "commsync.yaml",
        uri=server.uri,
        database=db.name,
        mailboxes=[dovecot.mailbox(user, name=name, folders=["INBOX", "Archive"]) for name, user in users.items()],
        daemon={
            "poll_interval": "1s",
            "backoff_max": "2s",
            "lease_ttl": "6s",
            "parse_workers": 1,
            "shutdown_timeout": "10s",
            "instance": "solo",
            "http": {"listen": f"127.0.0.1:{port}"},
        },
    )
    daemon = DaemonProcess("solo", config, tmp_path, http_port=port)
    stream = MailStream(dovecot, users, customers)
    try:
        wait_until(daemon.listening, 30, what=lambda: f"the daemon's HTTP listener\n{daemon.tail()}")
        wait_until(lambda: len(db.lease_owners()) == len(users), 30, what="the daemon owns every source")
        stream.start()
        wait_until(lambda: len(db.records()) >= 10, 30, what=lambda: f"capture under way\n{daemon.tail()}")
        assert daemon.get("/healthz").status == 200

        lines_before = len(daemon.events())
        server.stop()
        outage_started = time.monotonic()
        unhealthy = []
        # The outage lasts OUTAGE_S whatever happens; meanwhile /healthz is asked again and again.
        while time.monotonic() - outage_started < OUTAGE_S:
            assert daemon.alive, daemon.tail()
            unhealthy.append(daemon.get("/healthz", timeout=10))
        during_metrics = daemon.get("/metrics").body
        lines_during = len(daemon.events()) - lines_before
        server.start()
        recovered_at = time.monotonic()

        # /healthz answered every time, quickly, 503, and said MongoDB is unreachable and why.
        assert unhealthy and all(a.status == 503 for a in unhealthy[1:]), [(a.status, a.body) for a in unhealthy]
        assert max(a.seconds for a in unhealthy) < PING_TIMEOUT_S + 1.0, [round(a.seconds, 2) for a in unhealthy]
        reason = unhealthy[-1].json()["mongodb"]
        assert reason.startswith("unreachable: ") and "Error" in reason and len(reason) > len("unreachable: ") + 20, reason
        # Each source's consecutive failures were visible while MongoDB was down.
        assert all((_metric(during_metrics, "commsync_source_consecutive_failures", name) or 0) >= 1 for name in users), during_metrics

        wait_until(lambda: daemon.get("/healthz").status == 200, 30, what=lambda: f"/healthz healthy again\n{daemon.tail()}")
        # While it catches up, no checkpoint is ever ahead of the stored mail.
        violations: list[str] = []

        def caught_up(target: int) -> bool:
            appended = stream.snapshot()
            violations.extend(db.checkpoint_violations(appended))
            return len(appended) >= target and not db.missing(appended)

        target = stream.count() + 10
        wait_until(lambda: caught_up(target), 60, interval=0.3, what=lambda: f"capture catches up\n{daemon.tail()}")
        appended = stream.stop()
        wait_until(lambda: caught_up(len(appended)), 30, interval=0.3, what=lambda: f"the last mail stored\n{daemon.tail()}")
        assert not violations, violations[:10]
        assert daemon.alive, daemon.tail()

        # After recovery: no failure in a row now, the last error of the outage kept, a success since.
        status = json.loads(commsync(config, "status", "--json").stdout)
        rows = {r["source"]: r for r in status["sources"]}
        for name in users:
            row = rows[name]
            assert row["owner"] == "solo" and row["consecutive_failures"] == 0, row
            assert row["last_error"] and "ServerSelectionTimeoutError" in row["last_error"], row
            assert row["last_success"] > row["last_error_at"], row
        metrics = daemon.get("/metrics").body
        for name in users:
            assert _metric(metrics, "commsync_source_errors_total", name) >= 1, metrics
            assert _metric(metrics, "commsync_source_consecutive_failures", name) == 0, metrics
            assert _metric(metrics, "commsync_last_success_timestamp_seconds", name) > time.time() - (time.monotonic() - recovered_at) - 1

        assert daemon.stop() == 0, daemon.tail()
        events = daemon.events()
    finally:
        if stream._thread.is_alive():
            stream._stop.set()
        if daemon.alive:
            daemon.kill()

    # No spinning and no flood: a bounded number of lines in the outage, one traceback per source's failure run.
    assert lines_during < 40 * len(users), f"{lines_during} log lines in a {OUTAGE_S}s outage"
    tracebacks = [e for e in events if "exception" in e]
    assert len(tracebacks) <= len(users), [(e["event"], e.get("source")) for e in tracebacks]
    assert all(len(json.dumps(e)) < 2000 for e in events if "exception" not in e), max(events, key=lambda e: len(json.dumps(e)))

    assert not db.exactly_once_problems(appended), db.exactly_once_problems(appended)[:10]
    assert not db.history_differences(), db.history_differences()[:5]
    db.close()
