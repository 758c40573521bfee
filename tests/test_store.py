"""Store contract: idempotent upserts, matching, histories equal to a rebuild, constant round trips.

Runs on mongomock and on the real MongoDB server of the tests ([mongomock] and [real]).
"""

from __future__ import annotations

import asyncio

from records import T0, email_record, hours


def _strip(doc):
    return {k: v for k, v in doc.items() if k != "updated_at"}


async def _histories(store):
    return {d["_id"]: _strip(d) for d in await store.history.find().to_list(None)}


async def _assert_history_is_rebuild(store):
    rebuilt = {k: _strip(v) for k, v in (await store.rebuild_history()).items()}
    assert await _histories(store) == rebuilt


async def test_same_batch_twice_is_one_record_each(store):
    await store.customers.insert_one({"_id": "c1", "emails": ["alice@example.com"]})
    batch = [email_record(f"m{i}@x", uid=i, at=T0 + hours(i)) for i in range(5)]
    await store.write_batch(batch)
    await store.write_batch(batch)
    assert await store.records.count_documents({}) == 5
    doc = await store.records.find_one({"_id": "m3@x"})
    assert len(doc["sources"]) == 1
    assert (await store.history.find_one({"_id": "c1"}))["total"] == 5


async def test_same_message_in_two_mailboxes_is_one_record_with_two_sources(store):
    await store.write_batch([email_record("m@x", source="sales", folder="INBOX", uid=7)])
    await store.write_batch([email_record("m@x", source="support", folder="Sent", uid=3)])
    doc = await store.records.find_one({"_id": "m@x"})
    assert {(s["source"], s["folder"], s["uid"]) for s in doc["sources"]} == {("sales", "INBOX", 7), ("support", "Sent", 3)}
    assert await store.records.count_documents({}) == 1


async def test_duplicates_inside_one_batch_merge_their_sources(store):
    a = email_record("dup@x", folder="INBOX", uid=1)
    b = email_record("dup@x", folder="Archive", uid=9)
    result = await store.write_batch([a, b])
    assert result.records == 1
    doc = await store.records.find_one({"_id": "dup@x"})
    assert len(doc["sources"]) == 2


async def test_matching_is_case_insensitive_and_ignores_internal_addresses(store):
    await store.customers.insert_many(
        [
            {"_id": "c1", "name": "Alice", "emails": ["Alice@Example.COM"]},
            {"_id": "c2", "name": "Shared inbox", "emails": ["alice@example.com", "other@example.com"]},
            # A CRM entry for our own mailbox must not turn every email into a contact with it.
            {"_id": "c3", "name": "Us", "emails": ["sales@ourco.example"]},
        ]
    )
    await store.write_batch([email_record("m1@x", "alice@example.com"), email_record("m2@x", "nobody@example.org")])
    assert (await store.records.find_one({"_id": "m1@x"}))["customer_ids"] == ["c1", "c2"]
    assert (await store.records.find_one({"_id": "m2@x"}))["customer_ids"] == []
    assert set(await _histories(store)) == {"c1", "c2"}


async def test_history_fields(store):
    await store.customers.insert_one({"_id": "c1", "emails": ["alice@example.com"]})
    await store.write_batch(
        [
            email_record("a@x", at=T0, direction="inbound"),
            email_record("b@x", at=T0 + hours(5), direction="outbound"),
            email_record("c@x", at=T0 + hours(2), direction="inbound"),
        ]
    )
    h = await store.history.find_one({"_id": "c1"})
    assert h["total"] == 3
    assert (h["inbound"], h["outbound"]) == (2, 1)
    assert h["first_at"] == T0
    assert h["last_at"] == T0 + hours(5)
    assert (h["last_channel"], h["last_direction"]) == ("email", "outbound")
    # The first and latest records' ids let a batch update the entry without reading the customer's past.
    assert h["channels"]["email"] == {
        "count": 3,
        "first_at": T0,
        "last_at": T0 + hours(5),
        "first_id": "a@x",
        "last_id": "b@x",
        "last_direction": "outbound",
    }
    assert h["updated_at"].tzinfo is not None


async def test_history_equals_rebuild_after_many_batches_and_a_customer_change(store):
    await store.customers.insert_many(
        [{"_id": "c1", "emails": ["a@example.com"]}, {"_id": "c2", "emails": ["b@example.com"]}]
    )
    for n in range(4):
        await store.write_batch(
            [
                email_record(f"m{n}-{i}@x", ("a" if i % 3 else "b") + "@example.com", at=T0 + hours(n * 10 + i), uid=n * 10 + i)
                for i in range(10)
            ]
        )
    await _assert_history_is_rebuild(store)
    # The CRM moves the address to another customer; a re-read moves the record and both histories follow.
    await store.customers.update_one({"_id": "c2"}, {"$set": {"emails": []}})
    await store.customers.insert_one({"_id": "c9", "emails": ["b@example.com"]})
    moved = [email_record(f"m0-{i}@x", "b@example.com", at=T0 + hours(i), uid=i) for i in range(0, 10, 3)]
    await store.write_batch(moved)
    await _assert_history_is_rebuild(store)
    assert (await store.history.find_one({"_id": "c9"}))["total"] == len(moved)


async def test_customer_left_without_records_loses_its_history(store):
    await store.customers.insert_one({"_id": "c1", "emails": ["a@example.com"]})
    await store.write_batch([email_record("m@x", "a@example.com")])
    assert await store.history.count_documents({"_id": "c1"}) == 1
    await store.customers.update_one({"_id": "c1"}, {"$set": {"emails": ["new@example.com"]}})
    await store.write_batch([email_record("m@x", "a@example.com")])
    assert await store.history.count_documents({"_id": "c1"}) == 0
    await _assert_history_is_rebuild(store)


async def commands_of(store, coro):
    """Run ``coro`` and return the commands it sent, as the driver's command listener saw them."""
    before = store.commands.count
    await coro
    return store.commands.names[before - store.commands.count :] if store.commands.count > before else []


async def test_round_trips_per_batch_do_not_grow_with_batch_size(real_store):
    store = real_store
    await store.customers.insert_many([{"_id": f"c{i}", "emails": [f"p{i}@example.com"]} for i in range(50)])
    small = await commands_of(store, store.write_batch([email_record(f"s{i}@x", f"p{i % 50}@example.com", uid=i) for i in range(5)]))
    large = await commands_of(store, store.write_batch([email_record(f"l{i}@x", f"p{i % 50}@example.com", uid=i) for i in range(300)]))
    # previous customers, tombstones, suppressions and customers (sent together), then one
    # transaction: the records' history fields, their upsert, the touched histories, their write.
    assert small == large
    assert sorted(small) == sorted(["find", "find", "find", "find", "find", "update", "find", "update", "commitTransaction"])


async def test_drop_sources_marks_stale_uidvalidity_entries_gone(store):
    await store.write_batch([email_record("m@x", uidvalidity=1, uid=5), email_record("k@x", folder="Sent", uidvalidity=1, uid=1)])
    fresh = email_record("m@x", uidvalidity=2, uid=1)
    drop = {"kind": "imap", "source": "sales", "folder": "INBOX", "uidvalidity": {"$ne": 2}}
    await store.write_batch([fresh], drop_sources=drop)
    old, new = (await store.records.find_one({"_id": "m@x"}))["sources"]
    # The record keeps where it was seen, marked gone, beside where it is now.
    assert old["uidvalidity"] == 1 and old["gone_at"] is not None
    assert new == fresh["sources"][0]
    # Another folder's entries are not touched.
    assert (await store.records.find_one({"_id": "k@x"}))["sources"][0].get("gone_at") is None
    # Marking is idempotent: a second reset leaves the first mark as it was.
    await store.write_batch([fresh], drop_sources=drop)
    assert (await store.records.find_one({"_id": "m@x"}))["sources"][0]["gone_at"] == old["gone_at"]


async def test_checkpoints_round_trip(store):
    assert await store.load_state("sales") == {}
    await store.save_checkpoint("sales", "INBOX", {"uidvalidity": 3, "last_uid": 10})
    await store.save_checkpoint("sales", "INBOX", {"uidvalidity": 3, "last_uid": 12})
    await store.save_checkpoint("sales", "Sent", {"uidvalidity": 4, "last_uid": 1})
    await store.save_checkpoint("other", "INBOX", {"uidvalidity": 9, "last_uid": 99})
    assert await store.load_state("sales") == {
        "INBOX": {"uidvalidity": 3, "last_uid": 12},
        "Sent": {"uidvalidity": 4, "last_uid": 1},
    }


async def test_ingested_at_is_kept_on_re_read(store):
    await store.write_batch([email_record("m@x")])
    first = (await store.records.find_one({"_id": "m@x"}))["ingested_at"]
    await store.write_batch([email_record("m@x", folder="Sent")])
    assert (await store.records.find_one({"_id": "m@x"}))["ingested_at"] == first


async def test_a_slow_history_recomputation_does_not_overwrite_a_newer_one(store):
    """Two writers (two daemons on one database) touch the same customer; the slower one finishes last."""
    from commsync.daemon.store import Store

    other = Store(store.client, store.db.name, memory=store.memory)
    await store.customers.insert_one({"_id": "c1", "emails": ["alice@example.com"]})
    # With transactions the slow writer holds its transaction open while the other one writes. Its first
    # write to a fresh collection would collide with ours (SecantusDB, see test_history.py) until the
    # server dropped the open transaction; a first record makes the collection's indexes multikey.
    await store.write_batch([email_record("warm@x", "nobody@example.org")])
    aggregated = asyncio.Event()
    newer_written = asyncio.Event()
    write = store._write_history

    async def slow_write(*args, **kwargs):
        aggregated.set()
        await newer_written.wait()  # the other writer stores its newer history meanwhile
        await write(*args, **kwargs)

    store._write_history = slow_write
    first = asyncio.create_task(store.write_batch([email_record("a@x", at=T0)]))
    await aggregated.wait()
    await other.write_batch([email_record("b@x", at=T0 + hours(1))])
    newer_written.set()
    await first
    assert (await store.history.find_one({"_id": "c1"}))["total"] == 2
    await _assert_history_is_rebuild(store)
