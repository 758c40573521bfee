"""The `excluded` ledger: indexed for verify's query, emptied of void entries, one entry per item."""

from __future__ import annotations

from datetime import timedelta

from test_queries import _stages

from commsync.daemon import admin, capture, policy
from commsync.daemon.store import now_utc
from commsync.daemon.store import records as store_records

from records import T0, email_record

BLOCKED = "spam@blocked.example"


def blocked(rid, *, uid, uidvalidity=1, folder="INBOX", at=None):
    return email_record(rid, BLOCKED, source="m", folder=folder, uid=uid, uidvalidity=uidvalidity, at=at)


async def ledger(store):
    return sorted((d["stream"], d.get("uidvalidity"), d["item_id"], d["reason"]) for d in await store.excluded.find().to_list(None))


async def test_verifys_query_of_the_ledger_uses_its_index(real_store):
    await real_store.init_db()
    assert "source_stream_uidvalidity" in await real_store.excluded.index_information()
    real_store.capture = policy.CapturePolicy(blocked_addresses=frozenset({BLOCKED}))
    for folder in ("INBOX", "Sent", "Archive"):
        await real_store.write_batch([blocked(f"{folder}-{i}@x", uid=i, folder=folder) for i in range(1, 40)], source="m", stream=folder)
    plan = await real_store.excluded.find({"source": "m", "stream": "Sent", "uidvalidity": 1}, {"item_id": 1, "reason": 1}).explain()
    assert ("IXSCAN", "source_stream_uidvalidity") in _stages(plan["queryPlanner"]["winningPlan"])
    assert len(await real_store.excluded_items("m", "Sent", {"uidvalidity": 1})) == 39


async def test_a_new_uidvalidity_or_a_retired_folder_takes_its_entries_along(store):
    store.capture = policy.CapturePolicy(blocked_addresses=frozenset({BLOCKED}))
    await store.write_batch([blocked("a@x", uid=1), blocked("b@x", uid=2)], source="m", stream="INBOX")
    await store.write_batch([blocked("s@x", uid=1, folder="Sent")], source="m", stream="Sent")
    # The folder was renumbered: the first batch under UIDVALIDITY 2 carries what the connector drops.
    drop = {"kind": "imap", "source": "m", "folder": "INBOX", "uidvalidity": {"$ne": 2}}
    await store.write_batch([blocked("a@x", uid=7, uidvalidity=2)], source="m", stream="INBOX", drop_sources=drop)
    assert await ledger(store) == [("INBOX", 2, 7, "blocklisted"), ("Sent", 1, 1, "blocklisted")]
    assert await store.excluded_items("m", "INBOX", {"uidvalidity": 1}) == {}
    # Restored from a backup: the same UIDVALIDITY, whose old UIDs name other messages now.
    await store.write_batch([], source="m", stream="INBOX", drop_sources={"kind": "imap", "source": "m", "folder": "INBOX", "uidvalidity": 2})
    assert await ledger(store) == [("Sent", 1, 1, "blocklisted")]
    # Sent is gone from the server.
    await store.write_batch([], source="m", stream="Sent", drop_sources={"kind": "imap", "source": "m", "folder": "Sent"})
    assert await ledger(store) == []


async def test_purge_takes_the_entries_of_items_past_retention_along(store):
    now = now_utc()
    store.capture = policy.CapturePolicy(blocked_addresses=frozenset({BLOCKED}))
    await store.write_batch([blocked("old@x", uid=1, at=now - timedelta(days=400)), blocked("new@x", uid=2, at=now - timedelta(days=1))], source="m", stream="INBOX")
    # Left out because of retention itself: kept, it is why verify does not call the old item missing.
    store.capture = policy.CapturePolicy(retention=timedelta(days=30))
    await store.write_batch([email_record("ancient@x", source="m", uid=3, at=T0 - timedelta(days=400))], source="m", stream="INBOX")
    assert len(await ledger(store)) == 3
    await admin.purge(store, 30, now=now)
    assert await ledger(store) == [("INBOX", 1, 2, "blocklisted"), ("INBOX", 1, 3, "retention")]


def test_items_of_a_record_merged_from_two_uids():
    record = capture.merge_duplicates([blocked("d@x", uid=4), blocked("d@x", uid=9), blocked("d@x", uid=5, folder="Sent")])["d@x"]
    assert capture.items_of(record, "m", "INBOX") == [(4, {"uidvalidity": 1}), (9, {"uidvalidity": 1})]
    assert capture.items_of(record, "m", "Sent") == [(5, {"uidvalidity": 1})]
    sms = {"_id": "SM1", "sources": [{"kind": "twilio", "source": "t"}]}
    assert capture.items_of(sms, "t", "messages") == [("SM1", {})]


async def test_a_message_under_two_uids_is_noted_and_quarantined_under_both(memory_store, monkeypatch):
    memory_store.capture = policy.CapturePolicy(blocked_addresses=frozenset({BLOCKED}))
    await memory_store.write_batch([blocked("d@x", uid=4), blocked("d@x", uid=9)], source="m", stream="INBOX")
    assert set(await memory_store.excluded_items("m", "INBOX", {"uidvalidity": 1})) == {4, 9}
    # Every record is too large now: the server would refuse it.
    monkeypatch.setattr(store_records, "MAX_DOCUMENT_BYTES", 10)
    monkeypatch.setattr(store_records, "_SURELY_SMALL", 0)
    result = await memory_store.write_batch([email_record("q@x", source="m", uid=5), email_record("q@x", source="m", uid=6)], source="m", stream="INBOX")
    assert result.quarantined == 2
    assert await memory_store.quarantined_items("m", "INBOX") == {5, 6}
