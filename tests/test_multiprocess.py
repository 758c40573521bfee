"""Two `commsync run` processes share six mailboxes on one real MongoDB server; one is killed.

Through the console script, over sockets: both instances get a share of the
sources, a `kill -9` hands the dead one's sources to the survivor within a
lease time and a keeper tick, and mail appended all along is stored exactly
once with histories equal to a rebuild.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from structlog.testing import capture_logs

from commsync.config import settings_from_dict
from commsync.daemon import app

from daemons import Database, MailStream, commsync, foreign_checkpoints, start_instances, wait_until
from mongo_server import EXTERNAL_URI, MongoTestServer, server_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(EXTERNAL_URI is not None, reason="runs a server of its own: not with COMMSYNC_TEST_MONGODB_URI"),
    pytest.mark.skipif(server_binary() is None, reason="secantusd-py not installed (pip install -e '.[test]')"),
]

LEASE_TTL_S = 6.0
# Expiry, then the survivor's next keeper tick (a third of the lease), then the slack of a loaded 2-core machine.
HANDOVER_LIMIT_S = LEASE_TTL_S + LEASE_TTL_S / 3 + 3.0


@pytest.fixture(scope="module")
def server():
    with MongoTestServer() as s:
        yield s


def test_two_instances_share_the_sources_and_a_killed_one_hands_them_over(server, dovecot, tmp_path):
    db = Database(server.uri, f"multi_{uuid.uuid4().hex[:8]}")
    customers = db.seed_customers(5)
    users = {f"mb{i}": dovecot.new_user(f"mp{i}-") for i in range(6)}
    mailboxes = [dovecot.mailbox(user, name=name, folders=["INBOX", "Archive"]) for name, user in users.items()]
    daemons = start_instances(["alpha", "beta"], uri=server.uri, database=db.name, mailboxes=mailboxes, workdir=tmp_path, lease_ttl_s=LEASE_TTL_S)
    alpha, beta = daemons["alpha"], daemons["beta"]
    stream = MailStream(dovecot, users, customers).start()
    violations: list[str] = []

    def stored(appended) -> bool:
        violations.extend(db.checkpoint_violations(appended))
        return not db.missing(appended)

    try:
        owners = wait_until(lambda: _split(db), 60, what=lambda: f"both instances own sources: {db.lease_owners()}\n{alpha.tail()}\n{beta.tail()}")
        wait_until(lambda: stream.count() >= 30, 30, what="30 messages appended")
        early = stream.snapshot()
        wait_until(lambda: stored(early), 60, interval=0.3, what=lambda: f"capture under way: missing {db.missing(early)[:5]}\n{alpha.tail()}\n{beta.tail()}")

        orphaned = {s for s, o in owners.items() if o == "alpha"}
        # alpha dies at work: it has stored and checkpointed mail of each of its sources.
        wait_until(lambda: orphaned <= {e["source"] for e in alpha.named("checkpoint_saved")}, 30, what=lambda: f"alpha at work\n{alpha.tail()}")
        alpha.kill()
        killed = time.monotonic()
        wait_until(lambda: set(db.lease_owners().values()) == {"beta"} and len(db.lease_owners()) == len(users), 30, interval=0.1, what=lambda: f"beta owns every source\n{beta.tail()}")
        handover = time.monotonic() - killed
        assert handover < HANDOVER_LIMIT_S, f"hand-over took {handover:.1f}s"

        # `commsync status` puts the dead instance's sources under the survivor, and only the survivor is alive.
        status = json.loads(commsync(tmp_path / "beta.yaml", "status", "--json").stdout)
        rows = {r["source"]: r for r in status["sources"]}
        assert {rows[s]["owner"] for s in users} == {"beta"}, rows
        assert all(rows[s]["state"] not in ("no owner", "never run") for s in orphaned), rows
        assert [i["owner"] for i in status["instances"] if i["alive"]] == ["beta"], status["instances"]

        # Mail keeps coming after the hand-over; then everything appended is stored.
        target = stream.count() + 20
        wait_until(lambda: stream.count() >= target, 30, what="20 more messages appended")
        later = stream.snapshot()
        wait_until(lambda: stored(later), 60, interval=0.3, what=lambda: f"capture after the hand-over: missing {db.missing(later)[:5]}\n{beta.tail()}")
        appended = stream.stop()
        wait_until(lambda: stored(appended), 30, interval=0.3, what=lambda: f"the last mail stored: missing {db.missing(appended)[:5]}\n{beta.tail()}")
        assert beta.stop() == 0, beta.tail()
    finally:
        stream.halt()
        for d in daemons.values():
            if d.alive:
                d.kill()

    assert not violations, violations[:10]
    assert not db.exactly_once_problems(appended), db.exactly_once_problems(appended)[:10]
    assert not db.history_differences(), db.history_differences()[:5]
    # One instance at a time worked each source: nobody checkpointed a source another had taken.
    assert not foreign_checkpoints(alpha, beta), foreign_checkpoints(alpha, beta)[:10]
    assert not beta.named("lease_lost"), beta.named("lease_lost")
    # Nothing disturbed IMAP: no wait failed (a failing wait means a new pass at once, a spin).
    assert not alpha.named("imap_connection_lost") and not beta.named("imap_connection_lost"), beta.named("imap_connection_lost")[:3]
    db.close()


async def test_a_wait_on_several_folders_waits_for_mail_instead_of_spinning(dovecot, imap_user):
    # With two folders the connector asks for NOTIFY. Dovecot refuses MessageNew without
    # MessageExpunge (RFC 5465 5.2); each refusal counted as a lost connection and the next
    # pass came at once: several passes a second per source, for ever.
    settings = settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [dovecot.mailbox(imap_user, folders=["INBOX", "Archive"])]})
    (connector,) = app.build_connectors(settings, None)
    try:
        async for _ in connector.batches({}):
            pass
        with capture_logs() as logs:
            started = time.monotonic()
            changed = await connector.wait_for_change(1.5)
            took = time.monotonic() - started
    finally:
        await connector.aclose()
    assert [e for e in logs if e["event"] == "imap_connection_lost"] == []
    assert changed is False and took >= 1.4, (changed, took)


def _split(db: Database) -> dict[str, str] | None:
    """The lease owners once every source has one and both instances hold some."""
    owners = db.lease_owners()
    return owners if len(owners) == 6 and set(owners.values()) == {"alpha", "beta"} else None
