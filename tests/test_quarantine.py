"""Quarantine: items that could not be captured stay visible, are retried, and leave when they are stored."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
import structlog

from commsync.config import settings_from_dict
from commsync.connectors.base import MalformedItem
from commsync.daemon import app, upkeep
from commsync.daemon.runner import Runner, StoreSink
from commsync.daemon.store.quarantine import MAX_ATTEMPTS
from commsync.daemon.upkeep import PassUpkeep

from eventually import eventually
from mailgen import message


@pytest.fixture(autouse=True)
def _restore_structlog():
    yield
    structlog.reset_defaults()


def mailbox(dovecot, user):
    return dovecot.mailbox(user, addresses=[f"{user.name}@ourco.example"], folders=["INBOX"])


def test_quarantine_list_retry_and_drop_through_the_cli(dovecot, imap_user, cli):
    for i in range(3):
        dovecot.append(imap_user.name, "INBOX", message(i))
    cli.write(mailboxes=[mailbox(dovecot, imap_user)])
    assert cli("run", "--once")[0] == 0
    # As if UID 2 had killed its parser and UID 9 never existed (it went away since).
    cli.db(lambda db: db.records.delete_many({"sources.uid": 2}))
    uidvalidity = cli.db(lambda db: db.load_state("m"))["INBOX"]["uidvalidity"]
    for uid in (2, 9):
        item = MalformedItem("the parser process died on this message", item_id=uid, stream="INBOX", detail={"uidvalidity": uidvalidity})
        cli.db(lambda db, item=item: db.quarantine_items("m", "INBOX", [item]))

    code, out = cli("quarantine", "list")
    assert code == 0 and "m/INBOX/2" in out and "m/INBOX/9" in out and "the parser process died" in out
    code, out = cli("verify", "--json")
    assert code == 1 and json.loads(out)["quarantined"] == 2 and json.loads(out)["missing"] == []

    code, out = cli("quarantine", "retry", "m/INBOX/2")
    assert code == 0 and out.strip() == "m/INBOX/2: stored"
    assert cli.db(lambda db: db.records.count_documents({})) == 3
    code, out = cli("quarantine", "retry", "m/INBOX/9")
    assert code == 0 and out.strip() == "m/INBOX/9: no longer on the server: let go"
    assert cli("quarantine", "list")[1].strip() == "quarantine is empty"
    assert cli("verify")[0] == 0

    cli.db(lambda db: db.quarantine_items("m", "INBOX", [MalformedItem("why", item_id=3, stream="INBOX")]))
    assert cli("quarantine", "drop", "m/INBOX/3") == (0, "dropped m/INBOX/3\n")
    assert cli("quarantine", "drop", "m/INBOX/3")[0] == 2


async def test_a_pass_that_caught_up_retries_what_is_due(dovecot, imap_user, memory_store):
    for i in range(2):
        dovecot.append(imap_user.name, "INBOX", message(i))
    settings = settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [mailbox(dovecot, imap_user)]})
    await Runner(app.build_connectors(settings, None), StoreSink(memory_store), once=True).run()
    uidvalidity = (await memory_store.load_state("m"))["INBOX"]["uidvalidity"]
    # UID 1 "failed" back then: its record is not there, its entry is due now.
    await memory_store.records.delete_many({"sources.uid": 1})
    await memory_store.quarantine_items("m", "INBOX", [MalformedItem("died", item_id=1, stream="INBOX", detail={"uidvalidity": uidvalidity})])
    assert await memory_store.quarantine_retry_now("m/INBOX/1")

    sink = StoreSink(memory_store)
    upkeep = PassUpkeep(memory_store, sink, verify_every=None)
    runner = Runner(app.build_connectors(settings, None), sink, poll_interval=timedelta(seconds=30), after_pass=upkeep)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _count_is(memory_store, 2), what="the retried message stored")
        await eventually(lambda: _empty(memory_store))
    finally:
        runner.stop()
        await asyncio.wait_for(task, 10)


async def test_a_pass_with_nothing_due_asks_mongodb_nothing(dovecot, imap_user, real_store, monkeypatch):
    # At hundreds of mailboxes a query or two per source and pass is a good part of the quiet CPU (tests/bench_many.py).
    for i in range(2):
        dovecot.append(imap_user.name, "INBOX", message(i))
    settings = settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [mailbox(dovecot, imap_user)]})
    sink = StoreSink(real_store)
    await Runner(app.build_connectors(settings, None), sink, once=True).run()
    uidvalidity = (await real_store.load_state("m"))["INBOX"]["uidvalidity"]
    (connector,) = app.build_connectors(settings, None)
    passes = PassUpkeep(real_store, sink, verify_every=timedelta(hours=24))
    try:
        assert [r.stream for r in await passes(connector)] == ["INBOX"]  # the first pass verifies
        before = real_store.commands.count
        for _ in range(3):
            assert await passes(connector) is None
        assert real_store.commands.count == before
        # A retry that falls due is found at the next look, which covers every source at once.
        await real_store.records.delete_many({"sources.uid": 1})
        await real_store.quarantine_items("m", "INBOX", [MalformedItem("died", item_id=1, stream="INBOX", detail={"uidvalidity": uidvalidity})])
        assert await real_store.quarantine_retry_now("m/INBOX/1")
        monkeypatch.setattr(upkeep, "DUE_REFRESH_S", 0.0)
        assert await passes(connector) is None
        assert await real_store.quarantine_list() == []
        assert await real_store.records.count_documents({}) == 2
    finally:
        await connector.aclose()


async def _count_is(store, n):
    return await store.records.count_documents({}) == n


async def _empty(store):
    return await store.quarantine_list() == []


async def test_attempts_back_off_and_end_with_the_admin(store):
    item = MalformedItem("no valid call sid", item_id="CA" + "1" * 32, stream="calls")
    for n in range(1, MAX_ATTEMPTS + 1):
        await store.quarantine_items("support", "calls", [item])
        (entry,) = await store.quarantine_list()
        assert entry["attempts"] == n
        if n < MAX_ATTEMPTS:
            assert entry["next_attempt_at"] > entry["last_attempt_at"]
    assert entry["next_attempt_at"] is None  # the admin's turn: `quarantine retry` or `drop`
    assert await store.quarantine_due("support") == []
    # An item without an id can never be fetched again: it is the admin's from the start.
    await store.quarantine_items("support", "calls", [MalformedItem("not an object", stream="calls")])
    (no_id,) = [e for e in await store.quarantine_list() if e["item_id"] is None]
    assert no_id["next_attempt_at"] is None and no_id["attempts"] == 1


async def test_a_record_the_server_refuses_costs_that_record_not_the_batch(real_store):
    """The validator refuses one record: it goes to quarantine with its id and size, the others are stored."""
    from records import email_record

    await real_store.init_db()
    good = [email_record(f"ok{i}@x", uid=i) for i in range(3)]
    bad = {**email_record("bad@x", uid=9), "channel": "telegram"}  # not in the contract's channels
    with structlog.testing.capture_logs() as logs:
        result = await real_store.write_batch([*good, bad], source="sales", stream="INBOX")
    assert result.records == 3 and result.quarantined == 1 and result.refused == ("bad@x",)
    assert await real_store.records.count_documents({}) == 3
    (entry,) = await real_store.quarantine_list()
    assert (entry["item_id"], entry["record_id"]) == (9, "bad@x") and "code 121" in entry["reason"]
    # The log names the record, never its content.
    assert not any("subject bad@x" in json.dumps(e, default=str) for e in logs)


def test_a_cli_retry_that_cannot_read_its_folder_says_why(dovecot, imap_user, cli):
    dovecot.doveadm("mailbox", "create", "-u", imap_user.name, "Projects")
    dovecot.append(imap_user.name, "Projects", message(1))
    cli.write(mailboxes=[dovecot.mailbox(imap_user, addresses=[f"{imap_user.name}@ourco.example"], folders=["INBOX", "Projects"])])
    assert cli("run", "--once")[0] == 0
    uidvalidity = cli.db(lambda db: db.load_state("m"))["Projects"]["uidvalidity"]
    item = MalformedItem("the parser process died on this message", item_id=1, stream="Projects", detail={"uidvalidity": uidvalidity})
    cli.db(lambda db: db.quarantine_items("m", "Projects", [item]))
    dovecot.doveadm("mailbox", "delete", "-u", imap_user.name, "-s", "Projects")

    code, out = cli("quarantine", "retry", "m/Projects/1")
    assert code == 1
    assert out.startswith("m/Projects/1: still failing (") and "Projects" in out, out
    (entry,) = cli.db(lambda db: db.quarantine_list())
    assert entry["attempts"] == 2  # the capture that quarantined it, then this retry
