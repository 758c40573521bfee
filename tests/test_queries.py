"""Record filters: the query they build, what they select on a seeded store, and the index a real MongoDB uses."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from commsync.daemon import admin, policy, queries
from commsync.daemon.store import Store, id_variants
from records import T0, email_record, hours
from seed import ALICE, BOB_PHONE, seed

MONGODB_URI = os.environ.get("COMMSYNC_TEST_MONGODB_URI")


async def ids(store, **filters):
    q = queries.query(queries.Filters(**filters))
    return [d["_id"] async for d in admin.cursor(store, q, sort=queries.SORT)]


def test_query_shape():
    f = queries.Filters(
        customer=("c1",),
        channel="email",
        direction="inbound",
        since=T0,
        until=T0 + hours(1),
        participant=("a@example.com",),
        text="pallet  quote",
    )
    q = queries.query(f)
    assert q["customer_ids"] == "c1" and q["channel"] == "email" and q["direction"] == "inbound"
    assert q["occurred_at"] == {"$gte": T0, "$lt": T0 + hours(1)}
    assert q["participants.address"] == "a@example.com"
    assert len(q["$and"]) == 2  # every word must appear
    assert queries.query(queries.Filters(customer=("1", 1)))["customer_ids"] == {"$in": ["1", 1]}
    assert queries.Filters().is_empty() and not f.is_empty()
    # Regular-expression metacharacters in the words are taken literally.
    assert queries.text_clause("a.b*")["$or"][0]["subject"].pattern == r"a\.b\*"


def test_when_forms():
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert queries.parse_when("2025-03-01") == datetime(2025, 3, 1, tzinfo=UTC)
    assert queries.parse_when("2025-03-01T09:30") == datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
    assert queries.parse_when("2025-03-01T09:30:00+02:00") == datetime(2025, 3, 1, 7, 30, tzinfo=UTC)
    assert queries.parse_when("30d", now) == now - timedelta(days=30)
    assert queries.parse_when("12h", now) == now - timedelta(hours=12)
    with pytest.raises(ValueError, match="not a date"):
        queries.parse_when("last tuesday")
    with pytest.raises(ValueError):
        queries.parse_when("2025")  # a year, not 2025 seconds


def test_id_and_participant_variants():
    assert id_variants("c1") == ["c1"]
    assert id_variants("42") == ["42", 42]
    assert [type(v).__name__ for v in id_variants("65a1b2c3d4e5f6a7b8c9d0e1")] == ["str", "ObjectId"]
    assert policy.participant_keys(" Alice@Example.COM ") == ["alice@example.com", "Alice@Example.COM"]
    assert policy.participant_keys("(415) 555-0100", "US") == [BOB_PHONE, "(415) 555-0100"]


async def test_each_filter_on_a_seeded_store(memory_store):
    await seed(memory_store)
    everything = await ids(memory_store)
    assert everything == ["SM0001", "CA0001", "e5@x", "e4@x", "e3@x", "e2@x", "e1@x"]  # newest first
    assert await ids(memory_store, customer=("c-alice",)) == ["e4@x", "e2@x", "e1@x"]
    assert await ids(memory_store, customer=("c-bob",), channel="email") == ["e4@x", "e3@x"]
    assert await ids(memory_store, channel="call") == ["CA0001"]
    assert await ids(memory_store, direction="outbound") == ["e2@x"]
    assert await ids(memory_store, since=T0 + hours(2), until=T0 + hours(5)) == ["e5@x", "e4@x", "e3@x"]
    assert await ids(memory_store, participant=tuple(policy.participant_keys("ALICE@example.com"))) == ["e4@x", "e2@x", "e1@x"]
    assert await ids(memory_store, participant=tuple(policy.participant_keys("(415) 555-0100", "US"))) == ["SM0001", "CA0001"]
    assert await ids(memory_store, text="PALLET") == ["e3@x", "e2@x", "e1@x"]  # subject or content, any case
    assert await ids(memory_store, text="pallet quote") == ["e2@x", "e1@x"]
    assert await ids(memory_store, text="delivery tomorrow") == ["SM0001"]
    q = queries.query(queries.Filters(customer=("c-bob",)))
    assert [d["_id"] async for d in admin.cursor(memory_store, q, sort=queries.SORT, limit=2)] == ["SM0001", "CA0001"]


def _stages(plan):
    """Every stage name in an explain() plan, classic or slot-based."""
    found = []
    if isinstance(plan, dict):
        if "stage" in plan:
            found.append((plan["stage"], plan.get("indexName")))
        for value in plan.values():
            found += _stages(value)
    elif isinstance(plan, list):
        for value in plan:
            found += _stages(value)
    return found


@pytest.mark.skipif(not MONGODB_URI, reason="explain() needs a real MongoDB: set COMMSYNC_TEST_MONGODB_URI")
async def test_customer_timeline_of_100k_records_is_an_index_scan():
    name = f"commsync_test_{uuid.uuid4().hex[:12]}"
    store = Store.connect(MONGODB_URI, name)
    try:
        await store.init_db()
        for start in range(0, 100_000, 10_000):
            await store.records.insert_many(
                [
                    {**email_record(f"m{i}@x", ALICE, at=T0 + timedelta(minutes=i)), "customer_ids": ["c-big"], "ingested_at": T0, "schema_version": 1}
                    for i in range(start, start + 10_000)
                ],
                ordered=False,
            )
        await store.records.insert_many(
            [{**email_record(f"o{i}@x", at=T0), "customer_ids": [f"c{i % 50}"], "ingested_at": T0, "schema_version": 1} for i in range(5000)]
        )
        q = queries.query(queries.Filters(customer=("c-big",), since=T0 + timedelta(days=10)))
        plan = await store.records.find(q).sort(queries.SORT).limit(50).explain()
        stages = _stages(plan["queryPlanner"]["winningPlan"])
        names = [s for s, _ in stages]
        assert ("IXSCAN", "customer_time") in stages, plan["queryPlanner"]["winningPlan"]
        assert "COLLSCAN" not in names and "SORT" not in names  # the index gives the order too
        stats = plan.get("executionStats")
        if stats:
            assert stats["nReturned"] == 50 and stats["totalDocsExamined"] <= 50
    finally:
        await store.client.drop_database(name)
        store.close()
