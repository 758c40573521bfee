"""Admin operations on a seeded store: delete, forget, purge, rematch, import, export, schema, maintenance."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import datetime, timedelta

import pymongo.errors
import pytest
from jsonschema import Draft4Validator, validators

from commsync.config import settings_from_dict
from commsync.connectors.mail import normalize_email
from commsync.daemon import admin, maintenance, policy, queries, schema
from commsync.daemon.store import now_utc

from records import T0, email_record, hours
from seed import ALICE, BOB, CORPUS, STRANGER, assert_histories_are_rebuild, phone_record, seed, seed_records, with_cc


def settings(**extra):
    return settings_from_dict({"mongodb": {"uri": "memory://"}, **extra})


async def record_ids(store):
    return sorted(d["_id"] for d in await store.records.find({}, {"_id": 1}).to_list(None))


# -- delete -------------------------------------------------------------------------------------


async def test_delete_tombstones_and_recomputes_histories(store):
    await seed(store)
    q = queries.query(queries.Filters(customer=("c-alice",), until=T0 + hours(2)))
    assert await admin.count(store, q) == admin.Selection(records=2, customers=1)
    assert await admin.delete(store, q) == admin.Selection(records=2, customers=1)
    assert await record_ids(store) == ["CA0001", "SM0001", "e3@x", "e4@x", "e5@x"]
    assert (await store.history.find_one({"_id": "c-alice"}))["total"] == 1
    await assert_histories_are_rebuild(store)
    tomb = await store.tombstones.find_one({"_id": "e1@x"})
    assert tomb["reason"] == "delete" and tomb["occurred_at"] == T0 and tomb["deleted_at"]
    # The same records read again (another folder, a re-sync) stay deleted.
    result = await store.write_batch(seed_records())
    assert dict(result.not_captured) == {"tombstoned": 2}
    assert await record_ids(store) == ["CA0001", "SM0001", "e3@x", "e4@x", "e5@x"]
    await assert_histories_are_rebuild(store)


async def test_delete_of_a_customers_last_records_removes_its_history(store):
    await seed(store)
    await admin.delete(store, queries.query(queries.Filters(customer=("c-alice",))))
    assert await store.history.count_documents({"_id": "c-alice"}) == 0
    assert (await store.history.find_one({"_id": "c-bob"}))["total"] == 3  # e4 involved both
    await assert_histories_are_rebuild(store)


async def test_delete_walks_large_selections_in_chunks(store, monkeypatch):
    monkeypatch.setattr(admin, "CHUNK", 7)
    await store.customers.insert_one({"_id": "c-alice", "emails": [ALICE]})
    await store.write_batch([email_record(f"m{i}@x", ALICE, at=T0 + hours(i), uid=i) for i in range(30)])
    await store.write_batch([email_record("keep@x", BOB, at=T0)])
    done = await admin.delete(store, queries.query(queries.Filters(customer=("c-alice",))))
    assert done == admin.Selection(30, 1)
    assert await record_ids(store) == ["keep@x"]
    assert await store.tombstones.count_documents({}) == 30
    assert await store.history.count_documents({}) == 0


# -- forget -------------------------------------------------------------------------------------


async def test_forget_removes_the_customer_everywhere_and_suppresses_their_addresses(store):
    await seed(store)
    report = await admin.forget(store, "c-alice")
    assert (report.found, report.deleted, report.unlinked, report.suppressed) == (True, 2, 1, 1)
    assert report.history_deleted and report.others == {"c-bob"}
    assert not report.customer_deleted  # the CRM's document is the CRM's
    assert await record_ids(store) == ["CA0001", "SM0001", "e3@x", "e4@x", "e5@x"]
    shared = await store.records.find_one({"_id": "e4@x"})
    assert shared["customer_ids"] == ["c-bob"]
    assert ALICE not in {p["address"] for p in shared["participants"]}
    assert await store.history.count_documents({"_id": "c-alice"}) == 0
    await assert_histories_are_rebuild(store)
    # Nothing stored names her address any more; the suppression list holds a digest only.
    assert await store.records.count_documents({"participants.address": ALICE}) == 0
    assert [d["_id"] for d in await store.suppressions.find().to_list(None)] == [policy.suppression_key(ALICE)]
    # New mail with her alone is not captured; mail that also involves Bob is, without her.
    result = await store.write_batch([email_record("new@x", ALICE), with_cc(email_record("new2@x", ALICE), BOB)])
    assert dict(result.not_captured) == {"suppressed": 1}
    assert (await store.records.find_one({"_id": "new2@x"}))["customer_ids"] == ["c-bob"]
    # Even if the CRM keeps her address, re-matching cannot bring her back.
    await admin.rematch(store)
    assert await store.records.count_documents({"customer_ids": "c-alice"}) == 0


async def test_forget_keep_orphans_and_auto_created_customers(store):
    store.capture = policy.from_settings(settings(customers={"auto_create": "sent"}))
    await store.write_batch([email_record("o1@x", "dave@client.example", direction="outbound"), email_record("o2@x", "dave@client.example")])
    assert await store.customers.count_documents({"_id": "commsync:dave@client.example"}) == 1
    report = await admin.forget(store, "commsync:dave@client.example", keep_orphans=True, extra=["+1 415 555 0100"])
    assert (report.deleted, report.unlinked, report.suppressed) == (0, 2, 2)
    assert report.customer_deleted  # commsync made it, so it goes
    for doc in await store.records.find().to_list(None):
        assert doc["customer_ids"] == [] and "dave@client.example" not in {p["address"] for p in doc["participants"]}
    # The extra number given to forget is suppressed too.
    result = await store.write_batch([phone_record("SM9", "sms", T0)])
    assert dict(result.not_captured) == {"suppressed": 1}


async def test_forget_of_an_unknown_customer_only_unlinks(store):
    await seed(store)
    await store.customers.delete_one({"_id": "c-bob"})  # the CRM deleted it first
    report = await admin.forget(store, "c-bob")
    assert not report.found and report.suppressed == 0
    assert await store.records.count_documents({"customer_ids": "c-bob"}) == 0
    assert await store.history.count_documents({"_id": "c-bob"}) == 0
    await assert_histories_are_rebuild(store)


# -- retention ------------------------------------------------------------------------------------


async def test_purge_deletes_old_records_and_recomputes_histories(store):
    now = now_utc()
    await store.customers.insert_many([{"_id": "c-alice", "emails": [ALICE]}, {"_id": "c-bob", "emails": [BOB]}])
    await store.write_batch(
        [
            email_record("old1@x", ALICE, at=now - timedelta(days=100)),
            email_record("old2@x", BOB, at=now - timedelta(days=40)),
            email_record("new1@x", ALICE, at=now - timedelta(days=2)),
        ]
    )
    await store.tombstone_and_delete([{"_id": "ancient@x", "occurred_at": now - timedelta(days=90)}], "delete")
    assert await admin.purge(store, 30, dry_run=True) == admin.Selection(2, 2)
    assert await record_ids(store) == ["new1@x", "old1@x", "old2@x"]
    assert await admin.purge(store, 30) == admin.Selection(2, 2)
    assert await record_ids(store) == ["new1@x"]
    assert (await store.history.find_one({"_id": "c-alice"}))["total"] == 1
    assert await store.history.count_documents({"_id": "c-bob"}) == 0
    await assert_histories_are_rebuild(store)
    # Capture refuses what retention would purge, so old tombstones can go.
    assert await store.tombstones.count_documents({}) == 0


# -- rematch ------------------------------------------------------------------------------------------


async def test_rematch_after_adding_an_address_to_a_customer(store):
    await seed(store)
    assert (await store.records.find_one({"_id": "e5@x"}))["customer_ids"] == []
    await store.customers.update_one({"_id": "c-carol"}, {"$push": {"emails": "Stranger@Nowhere.example"}})
    report = await admin.rematch(store, "c-carol")
    assert (report.relinked, report.customers) == (1, {"c-carol"})
    assert (await store.records.find_one({"_id": "e5@x"}))["customer_ids"] == ["c-carol"]
    assert (await store.history.find_one({"_id": "c-carol"}))["total"] == 1
    await assert_histories_are_rebuild(store)


async def test_rematch_after_removing_an_address(store):
    await seed(store)
    await store.customers.update_one({"_id": "c-bob"}, {"$set": {"emails": []}})
    report = await admin.rematch(store, "c-bob")
    assert report.relinked == 2  # e3 and e4 lose Bob; his call and text keep him (phone)
    assert (await store.records.find_one({"_id": "e4@x"}))["customer_ids"] == ["c-alice"]
    assert (await store.history.find_one({"_id": "c-bob"}))["channels"].keys() == {"call", "sms"}
    await assert_histories_are_rebuild(store)


async def test_rematch_everything_and_unmatched_only(store, monkeypatch):
    monkeypatch.setattr(admin, "CHUNK", 3)
    await seed(store)
    await store.customers.insert_one({"_id": "c-new", "emails": [STRANGER.upper()]})
    report = await admin.rematch_unmatched(store, customers_per_query=2)
    assert (report.examined, report.relinked) == (1, 1)
    assert (await store.records.find_one({"_id": "e5@x"}))["customer_ids"] == ["c-new"]
    await store.customers.update_one({"_id": "c-alice"}, {"$set": {"emails": []}})
    report = await admin.rematch(store)
    assert report.examined == 7 and report.relinked == 3
    await assert_histories_are_rebuild(store)


# -- customers import --------------------------------------------------------------------------------


async def test_import_customers_from_csv_and_json_lines(store, tmp_path):
    await store.write_batch(seed_records())  # captured before any customer existed
    table = tmp_path / "customers.csv"
    table.write_text(
        "id,name,emails,phones\n"
        'c-alice,Alice Example,"Alice@Example.com; ali@example.com",\n'
        "c-bob,Bob Sample,bob@example.org,(415) 555-0100\n"
        "c-bad,Bad Row,not-an-address,\n"
        ",No Id,x@example.com,\n",
        encoding="utf-8",
    )
    store.default_region = "US"
    report = await admin.import_customers(store, admin.read_customers(table, region="US"))
    assert (report.inserted, report.updated) == (2, 0)
    assert report.rejected == [(4, "'not-an-address' is not an email address"), (5, "no id")]
    alice = await store.customers.find_one({"_id": "c-alice"})
    assert alice["emails"] == ["alice@example.com", "ali@example.com"] and alice["created_by"] == "commsync" and alice["origin"] == "import"
    assert (await store.customers.find_one({"_id": "c-bob"}))["phones"] == ["+14155550100"]
    # The records that involve them are linked now.
    assert report.rematch.relinked == 6
    assert (await store.history.find_one({"_id": "c-bob"}))["total"] == 4

    lines = tmp_path / "more.jsonl"
    lines.write_text(
        json.dumps({"id": "c-bob", "name": "Robert Sample", "emails": ["bob@example.org"], "phones": []}) + "\n"
        + json.dumps({"_id": 7, "name": "Stranger Things", "emails": STRANGER}) + "\n\n"
        + "{broken\n",
        encoding="utf-8",
    )
    report = await admin.import_customers(store, admin.read_customers(lines))
    assert (report.inserted, report.updated, [r[0] for r in report.rejected]) == (1, 1, [4])
    bob = await store.customers.find_one({"_id": "c-bob"})
    assert bob["name"] == "Robert Sample" and bob["phones"] == [] and bob["origin"] == "import"
    assert (await store.records.find_one({"_id": "e5@x"}))["customer_ids"] == [7]
    assert sorted((await store.records.find_one({"_id": "CA0001"}))["customer_ids"]) == []  # Bob's number was removed
    await assert_histories_are_rebuild(store)


# -- export ------------------------------------------------------------------------------------------------


class Recorder(io.StringIO):
    """A text stream that notes, at every write, how many records the cursor had handed out."""

    def __init__(self, produced):
        super().__init__()
        self.produced = produced
        self.writes = []

    def write(self, text):
        self.writes.append(self.produced[0])
        return super().write(text)


async def observed(store, q, produced):
    async for doc in admin.cursor(store, q, sort=queries.SORT):
        produced[0] += 1
        yield doc


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_export_streams_one_record_at_a_time(store, fmt):
    await store.write_batch([email_record(f"m{i:04d}@x", ALICE, at=T0 + hours(i), uid=i) for i in range(1500)])
    produced = [0]
    out = Recorder(produced)
    n = await admin.export(observed(store, {}, produced), out, fmt)
    assert n == 1500
    rows = out.writes[1:] if fmt == "csv" else out.writes  # CSV starts with its header, before any record
    # Each record is written as soon as it is read: never more than one in hand, never all at the end.
    assert rows == list(range(1, 1501))
    text = out.getvalue()
    if fmt == "csv":
        table = list(csv.reader(io.StringIO(text)))
        assert table[0] == list(admin.CSV_FIELDS) and len(table) == 1501
        assert table[1][0] == "m1499@x" and table[1][5] == ALICE
    else:
        first = json.loads(text.splitlines()[0])
        assert first["_id"] == "m1499@x" and datetime.fromisoformat(first["occurred_at"]) == T0 + hours(1499)


# -- schema validators ------------------------------------------------------------------------------------

_BSON = {
    "string": lambda _, v: isinstance(v, str),
    "int": lambda _, v: isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31,
    "long": lambda _, v: isinstance(v, int) and not isinstance(v, bool),
    "double": lambda _, v: isinstance(v, float),
    "bool": lambda _, v: isinstance(v, bool),
    "date": lambda _, v: isinstance(v, datetime),
    "null": lambda _, v: v is None,
    "object": lambda _, v: isinstance(v, dict),
    "array": lambda _, v: isinstance(v, list),
}
# The validators as MongoDB reads them: draft 4 with BSON type names (bsonType) instead of JSON ones.
BsonSchema = validators.extend(Draft4Validator, type_checker=Draft4Validator.TYPE_CHECKER.redefine_many(_BSON))


def as_json_schema(node):
    if isinstance(node, dict):
        return {("type" if k == "bsonType" else k): as_json_schema(v) for k, v in node.items()}
    if isinstance(node, list):
        return [as_json_schema(v) for v in node]
    return node


RECORDS = BsonSchema(as_json_schema(schema.record_schema()))
HISTORIES = BsonSchema(as_json_schema(schema.history_schema()))


def errors(validator, doc):
    return [e.message for e in validator.iter_errors(doc)]


async def test_stored_records_and_histories_satisfy_the_validators(store):
    await seed(store)
    corpus = sorted(CORPUS.glob("*.eml")) if CORPUS.is_dir() else []
    parsed = [normalize_email(p.read_bytes()) for p in corpus]
    for n, record in enumerate(parsed):
        record["sources"] = [{"kind": "mbox", "source": "corpus", "file": "corpus.mbox", "index": n}]
    store.capture = policy.CapturePolicy()
    await store.write_batch(parsed)
    docs = await store.records.find().to_list(None)
    assert len(docs) >= 7 + (100 if corpus else 0)
    for doc in docs:
        assert errors(RECORDS, doc) == [], doc["_id"]
    histories = await store.history.find().to_list(None)
    assert histories
    for doc in histories:
        assert errors(HISTORIES, doc) == [], doc["_id"]


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"occurred_at": "2025-03-01"}, "is not of type 'date'"),
        ({"channel": "fax"}, "is not one of"),
        ({"direction": "sideways"}, "is not one of"),
        ({"schema_version": None}, "is not of type"),
        ({"participants": [{"role": "from", "internal": False}]}, "'address' is a required property"),
        ({"sources": [{"kind": "imap"}]}, "'source' is a required property"),
        ({"_id": 12}, "is not of type 'string'"),
    ],
)
async def test_validators_reject_malformed_records(store, change, complaint):
    await store.write_batch([email_record("ok@x")])
    doc = await store.records.find_one({"_id": "ok@x"})
    assert errors(RECORDS, doc) == []
    bad = {**doc, **change}
    assert any(complaint in e for e in errors(RECORDS, bad)), errors(RECORDS, bad)
    missing = {k: v for k, v in doc.items() if k != "occurred_at"}
    assert errors(RECORDS, missing) == ["'occurred_at' is a required property"]


@pytest.mark.parametrize(
    "change",
    [{"occurred_at": "2025-03-01"}, {"channel": "fax"}, {"direction": "sideways"}, {"participants": [{"role": "from", "internal": False}]}, {"_id": 12}],
    ids=["date", "channel", "direction", "participant", "id"],
)
async def test_the_server_enforces_the_validators_on_insert_and_update(real_store, change):
    """What the jsonschema checks above promise, the server refuses (code 121), on insert and on update."""
    assert await real_store.init_db() is True
    await real_store.write_batch([email_record("ok@x")])
    doc = await real_store.records.find_one({"_id": "ok@x"})
    bad = {**doc, "_id": "bad@x", **change}
    with pytest.raises(pymongo.errors.WriteError) as refused:
        await real_store.records.insert_one(bad)
    assert refused.value.code == 121
    if "_id" not in change:
        with pytest.raises(pymongo.errors.WriteError) as refused:
            await real_store.records.update_one({"_id": "ok@x"}, {"$set": change})
        assert refused.value.code == 121
    assert await real_store.records.count_documents({}) == 1
    # A history the contract does not allow is refused too.
    with pytest.raises(pymongo.errors.WriteError):
        await real_store.history.insert_one({"_id": "c1", "total": "many"})


async def test_validators_go_onto_existing_collections_through_collmod(real_store):
    """Collections made before init-db (an older version, a CRM) get the validators too, and init-db is idempotent."""
    await real_store.records.insert_one({"_id": "legacy", "note": "written before the contract"})
    assert await real_store.init_db() is True
    assert await real_store.init_db() is True
    options = {c["name"]: c["options"] async for c in await real_store.db.list_collections()}
    assert options["records"]["validationLevel"] == "moderate" and "$jsonSchema" in options["records"]["validator"]
    assert "$jsonSchema" in options["customer_history"]["validator"]
    # moderate: the invalid legacy document may still be updated; a new invalid one is refused.
    await real_store.records.update_one({"_id": "legacy"}, {"$set": {"note": "touched"}})
    with pytest.raises(pymongo.errors.WriteError):
        await real_store.records.insert_one({"_id": "new", "note": "not a record"})


def test_validators_reject_malformed_histories():
    good = {
        "_id": "c1", "total": 2, "first_at": T0, "last_at": T0, "last_channel": "email", "last_direction": "inbound",
        "inbound": 2, "outbound": 0, "channels": {"email": {"count": 2, "first_at": T0, "last_at": T0}},
        "updated_at": T0, "schema_version": 1,
    }  # fmt: skip
    assert errors(HISTORIES, good) == []
    assert errors(HISTORIES, {**good, "total": "2"})
    assert errors(HISTORIES, {**good, "channels": {"email": {"count": 2}}})
    assert errors(HISTORIES, {k: v for k, v in good.items() if k != "last_at"})


async def test_init_db_installs_validators_on_a_real_server(store):
    installed = await store.init_db()
    if store.memory:
        assert installed is False  # mongomock ignores validators: the checks above cover the schema
        return
    assert installed is True
    await store.write_batch([email_record("ok@x")])
    with pytest.raises(Exception) as caught:
        await store.records.insert_one({"_id": "bad", "channel": "fax"})
    assert type(caught.value).__name__ == "WriteError"
    info = await store.db.command("listCollections", filter={"name": "records"})
    options = info["cursor"]["firstBatch"][0]["options"]
    assert options["validationLevel"] == "moderate" and options["validator"] == schema.validator(schema.record_schema())
    await store.init_db()  # again: collMod, no error


# -- maintenance ------------------------------------------------------------------------------------------


def test_schedule_runs_each_job_at_its_interval():
    s = maintenance.schedule_for(settings(retention={"days": 30}, rematch={"interval": "10m"}))
    s.start(0.0)
    assert s.ready(0.0) == ["purge", "rematch"]
    s.done("purge", 5.0)
    s.done("rematch", 5.0)
    assert s.ready(600.0) == [] and s.wait(600.0) == 5.0
    assert s.ready(605.0) == ["rematch"]
    assert s.ready(86405.0) == ["purge", "rematch"]
    assert "purge" not in maintenance.schedule_for(settings()).every  # no retention, no purge


async def test_maintenance_loop_purges_and_rematches_then_stops(store):
    now = now_utc()
    await store.write_batch([email_record("old@x", ALICE, at=now - timedelta(days=90)), email_record("new@x", ALICE, at=now)])
    await store.customers.insert_one({"_id": "c-alice", "emails": [ALICE]})
    stop = asyncio.Event()
    passes = []

    def on_pass(ran):
        passes.append(ran)
        stop.set()

    await maintenance.maintenance_loop(store, settings(retention={"days": 30}), stop, on_pass=on_pass)
    assert passes == [["purge", "rematch"]]
    assert await record_ids(store) == ["new@x"]
    assert (await store.records.find_one({"_id": "new@x"}))["customer_ids"] == ["c-alice"]
    assert (await store.history.find_one({"_id": "c-alice"}))["total"] == 1


async def test_a_failing_job_does_not_stop_the_loop(store, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(admin, "rematch_unmatched", broken)
    stop = asyncio.Event()
    passes = []

    def on_pass(ran):
        passes.append(ran)
        stop.set()

    await maintenance.maintenance_loop(store, settings(), stop, on_pass=on_pass)
    assert passes == [["rematch"]]


async def test_upkeep_stops_with_the_daemon(store):
    upkeep = maintenance.start(store, settings())
    await asyncio.sleep(0)
    await upkeep.stop(grace=5)
    assert upkeep._task.done() and not upkeep._task.cancelled()


@pytest.mark.parametrize("job_s, finished", [(0.2, True), (60, False)], ids=["within-grace", "cut-short"])
async def test_a_stop_lets_the_job_in_hand_finish_within_its_grace(memory_store, monkeypatch, job_s, finished):
    started, ended = asyncio.Event(), []

    async def slow_rematch(store):
        started.set()
        await asyncio.sleep(job_s)
        ended.append(True)

    monkeypatch.setattr(admin, "rematch_unmatched", slow_rematch)
    upkeep = maintenance.start(memory_store, settings())
    await asyncio.wait_for(started.wait(), 5)  # the first pass runs the re-match at once
    await upkeep.stop(grace=1.0)
    assert upkeep._task.done()
    assert ended == ([True] if finished else [])
    assert upkeep._task.cancelled() is not finished
