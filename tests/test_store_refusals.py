"""A write the server refuses never carries its documents into errors, logs, tracebacks or source_status.

pymongo's BulkWriteError reads "batch op errors occurred, full error: {...}"
with every refused operation's document in it: a customer's name, emails and
phones. The store raises `StoreWriteRefused` (counts and codes) instead.
"""

from __future__ import annotations

import json
import traceback

import pymongo.errors
import pytest
import structlog

from commsync.connectors.base import Batch
from commsync.daemon import logs, policy
from commsync.daemon.runner import Runner, StoreSink
from commsync.daemon.store import StoreWriteRefused
from commsync.daemon.store.refusals import refusal

from records import email_record

NAME = "Ada Refused-Lovelace"
EMAIL = "ada.refused@customer.example"
PHONE = "+14155550123"
PRIVATE = [NAME, EMAIL, PHONE, "ada.refused"]


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()
    logs.configure("info", json=True)


def leaked(text: str) -> list[str]:
    return [p for p in PRIVATE if p.lower() in text.lower()]


def outbound_to_ada(rid="m1@ourco.example"):
    record = email_record(rid, EMAIL, direction="outbound", source="m")
    for p in record["participants"]:
        if p["address"] == EMAIL:
            p["name"] = NAME
    return record


class OneBatch:
    """A source with one message to Ada."""

    kind = "test"
    name = "m"

    async def batches(self, state):
        yield Batch("INBOX", [outbound_to_ada()], {"uidvalidity": 1, "last_uid": 1})

    async def check(self):
        return "ok"

    async def aclose(self):
        pass


async def colliding(store):
    """A CRM with a unique index on customers.emails and Ada in it, whom capture's lookup missed.

    As when another daemon created her between this batch's lookup and its
    insert: commsync auto-creates a customer for her address and the index refuses it.
    """
    await store.customers.create_index([("emails", 1)], unique=True, name="crm_unique_emails")
    await store.customers.insert_one({"_id": "crm-ada", "name": NAME, "emails": [EMAIL], "phones": [PHONE]})
    store.capture = policy.CapturePolicy(auto_create="sent_and_received")

    async def missed(addresses):
        return {}

    store._customers_by_key = missed


async def test_a_refused_customer_insert_raises_codes_only(real_store):
    await colliding(real_store)
    with pytest.raises(StoreWriteRefused) as caught:
        await real_store.write_batch([outbound_to_ada()], source="m", stream="INBOX")
    exc = caught.value
    assert "11000 DuplicateKey" in str(exc) and 11000 in exc.codes
    assert exc.__cause__ is None and exc.__context__ is None
    assert leaked("".join(traceback.format_exception(exc))) == []


@pytest.mark.parametrize("json_mode", [True, False], ids=["json", "console"])
async def test_a_refused_customer_insert_leaves_no_document_in_logs_or_status(real_store, capsys, json_mode):
    await colliding(real_store)
    logs.configure("debug", json=json_mode)
    runner = Runner([OneBatch()], StoreSink(real_store), once=True, publish_status=True)
    assert await runner.run() is False
    status = runner.status["m"]
    assert "StoreWriteRefused" in status.last_error and "11000 DuplicateKey" in status.last_error
    out = capsys.readouterr()
    text = out.err + out.out
    assert "source_failed" in text and ("Traceback" in text or '"exception"' in text)  # the first failure's traceback
    stored = await real_store.source_status("m")
    assert "StoreWriteRefused" in json.dumps(stored, default=str)
    assert leaked(text) == [] and leaked(json.dumps(stored, default=str)) == [] and leaked(status.last_error) == []
    assert await real_store.customers.count_documents({}) == 1


class Refusing:
    """A collection whose bulk writes the server refuses with ``details`` (as pymongo reports them)."""

    def __init__(self, real, details):
        self.real, self.details = real, details

    def __getattr__(self, name):
        return getattr(self.real, name)

    async def bulk_write(self, ops, **kwargs):
        raise pymongo.errors.BulkWriteError(self.details)


def refused_op(code):
    op = {"q": {"_id": "x"}, "u": {"$set": {"name": NAME, "emails": [EMAIL], "phones": [PHONE]}}, "upsert": True}
    return {"index": 0, "code": code, "errmsg": f"E{code} refused {{ emails: \"{EMAIL}\" }}", "op": op, "keyValue": {"emails": EMAIL}}


def details(code=121, concern=False):
    out = {"writeErrors": [refused_op(code)], "writeConcernErrors": [], "nInserted": 0, "nUpserted": 0}
    if concern:
        out["writeErrors"] = []
        out["writeConcernErrors"] = [{"code": 64, "codeName": "WriteConcernFailed", "errmsg": f"waiting for {EMAIL}", "errInfo": {"doc": NAME}}]
    return out


async def _batch(store):
    await store.customers.insert_one({"_id": "c-ada", "emails": [EMAIL]})  # a history to write
    await store.write_batch([email_record("r1@x", EMAIL, source="m")], source="m", stream="INBOX")


async def _excluded(store):
    store.capture = policy.CapturePolicy(blocked_addresses=frozenset({EMAIL}))
    await _batch(store)


async def _tombstones(store):
    await store.tombstone_and_delete([{"_id": "r1@x"}], "delete")


async def _customers(store):
    await store.create_customers([{"_id": "auto-1", "name": NAME, "emails": [EMAIL], "phones": [PHONE]}])


@pytest.mark.parametrize(
    ("collection", "refusal_details", "call"),
    [
        ("records", details(concern=True), _batch),  # a write concern error: not a per-record refusal
        ("history", details(121), _batch),  # a recomputed history refused (not a revision's collision)
        ("excluded", details(121), _excluded),
        ("tombstones", details(121), _tombstones),
        ("customers", details(11000), _customers),
    ],
)
async def test_every_bulk_write_of_the_store_refuses_without_documents(memory_store, collection, refusal_details, call):
    setattr(memory_store, collection, Refusing(getattr(memory_store, collection), refusal_details))
    with pytest.raises(StoreWriteRefused) as caught:
        await call(memory_store)
    exc = caught.value
    assert "codes [" in str(exc)
    assert exc.__cause__ is None and exc.__context__ is None
    assert leaked("".join(traceback.format_exception(exc))) == []


def test_refusal_names_counts_and_codes():
    exc = pymongo.errors.BulkWriteError({**details(11000), "writeErrors": [refused_op(11000), {**refused_op(121), "index": 1}]})
    assert leaked(str(exc)) != []  # what the driver says
    assert str(refusal(exc)) == "2 writes refused: codes [121 DocumentValidationFailure, 11000 DuplicateKey]"
    assert str(refusal(pymongo.errors.BulkWriteError(details(concern=True)))) == "write concern not satisfied (1): codes [64 WriteConcernFailed]"
    single = pymongo.errors.WriteError(f"E11000 dup key: {{ emails: \"{EMAIL}\" }}", 11000, refused_op(11000))
    assert str(refusal(single)) == "write refused: codes [11000 DuplicateKey]"
    odd = pymongo.errors.OperationFailure("no", 13, {"ok": 0, "code": 13, "codeName": f"{EMAIL}", "errmsg": NAME})
    assert leaked(str(refusal(odd))) == [] and str(refusal(odd)) == "command refused: codes [13 Unauthorized]"


async def test_a_refused_record_is_still_quarantined_with_its_id_only(real_store):
    """One record the server refuses goes to quarantine, as before; its reason quotes no unique key's value."""
    real_store.transactions = False  # a standalone mongod: one bulk upsert, whose refusals are per record
    await real_store.records.create_index([("participants.address", 1)], unique=True, name="crm_unique")
    await real_store.write_batch([email_record("r1@x", EMAIL, source="m", uid=1)], source="m", stream="INBOX")
    result = await real_store.write_batch([email_record("r2@x", EMAIL, source="m", uid=2)], source="m", stream="INBOX")
    assert result.refused == ("r2@x",) and result.quarantined == 1
    (entry,) = await real_store.quarantine_list()
    assert "11000" in entry["reason"] and leaked(json.dumps(entry, default=str)) == []
