"""Twilio capture end to end: the real twilio client against FakeTwilio, the daemon's Runner, StoreSink and store.

Every test talks HTTP to tests/twilio_fake.py on 127.0.0.1 and asserts on
what was stored and on the fake's request log (what the connector asked for).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from commsync.config import ConfigError, load_settings, settings_from_dict
from commsync.connectors.base import CredentialsRefused
from commsync.connectors.twilio import PermissionDenied, TwilioConnector, TwilioUnavailable
from commsync.daemon import app
from commsync.daemon.cli import main
from commsync.daemon.runner import Runner
from commsync.daemon.store import Store

from mailgen import message
from records import email_record
from sinks import CountingSink, CrashingSink
from twilio_fake import FakeTwilio

ACC = "AC" + "1" * 32
ACC2 = "AC" + "2" * 32
TOKEN = "tok-Sup3rS3cret-1"
TOKEN2 = "tok-Sup3rS3cret-2"
OURS = "+14155550199"  # the account's Twilio number
CUSTOMER = "+14155550100"
T0 = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


@pytest.fixture
def fake():
    with FakeTwilio() as f:
        f.add_account(ACC, TOKEN, friendly_name="Support line")
        f.add_account(ACC2, TOKEN2, friendly_name="Sales line")
        yield f


@pytest.fixture
async def memory_store():
    """The store as `commsync run` opens it for these settings: numbers without a country code read as US."""
    s = Store.connect("memory://", f"t_{uuid.uuid4().hex[:12]}", default_region="US")
    await s.ensure_indexes()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _restore_structlog():
    # `main()` points structlog at pytest's captured stderr; later tests must not write to it once closed.
    yield
    structlog.reset_defaults()


def account(fake, name="support", sid=ACC, token=TOKEN, **extra):
    return {"name": name, "account_sid": sid, "auth_token": token, "base_url": fake.base_url, "since": "2025-03-01", **extra}


def settings_for(*accounts, mailboxes=(), **top):
    return settings_from_dict(
        {
            "mongodb": {"uri": "memory://"},
            "default_region": "US",
            "internal_domains": ["ourco.example"],
            "twilio_accounts": list(accounts),
            "mailboxes": list(mailboxes),
            **top,
        }
    )


async def sync(settings, store, sink=None):
    sink = sink or CountingSink(store)
    runner = Runner(app.build_connectors(settings, None), sink, once=True)
    ok = await runner.run()
    return ok, runner, sink


def add_call(fake, at, *, frm=CUSTOMER, to=OURS, direction="inbound", duration=60, acc=ACC, **kw):
    return fake.add_call(acc, start_time=at, from_=frm, to=to, direction=direction, duration=duration, **kw)["sid"]


def calls_requests(fake):
    return [r for r in fake.requests_to("/Calls.json") if "ParentCallSid" not in r.query]


async def records_by_id(store):
    return {r["_id"]: r for r in await store.records.find().to_list(None)}


def _strip(doc):
    return {k: v for k, v in doc.items() if k != "updated_at"}


# -- capture -----------------------------------------------------------------------------------


async def test_several_pages_become_records_with_the_contract_fields(fake, memory_store):
    sids = [add_call(fake, T0 + minutes(10 * i), duration=252 if i == 0 else 30 + i) for i in range(12)]
    out = add_call(fake, T0 + minutes(200), frm=OURS, to=CUSTOMER, direction="outbound-api", duration=45, price="-0.0130")
    settings = settings_for(account(fake, page_size=5, channels=["calls"]))

    ok, runner, sink = await sync(settings, memory_store)

    assert ok, runner.status
    assert [b[2] for b in sink.batches] == [5, 5, 3]  # one batch per page
    reqs = calls_requests(fake)
    assert len(reqs) == 3
    assert reqs[0].query == {"StartTime>": "2025-03-01", "PageSize": "5"}
    assert [r.query.get("Page") for r in reqs] == [None, "1", "2"]
    recs = await records_by_id(memory_store)
    assert set(recs) == {*sids, out}

    first = recs[sids[0]]
    assert first["channel"] == "call" and first["direction"] == "inbound"
    assert first["occurred_at"] == T0 and first["occurred_at"].tzinfo is not None
    assert first["participants"] == [
        {"role": "from", "address": CUSTOMER, "name": None, "internal": False},
        {"role": "to", "address": OURS, "name": None, "internal": True},
    ]
    assert first["subject"] is None and first["attachments"] == [] and first["content_truncated"] is False
    assert first["content"] == "Inbound call, 4 min 12 s, completed"
    assert first["thread_id"] == CUSTOMER
    assert first["sources"] == [{"kind": "twilio", "source": "support", "account_sid": ACC, "list": "calls"}]
    assert first["call"] == {"status": "completed", "duration_s": 252, "price": None, "price_unit": "USD", "recordings": [], "legs": []}
    assert first["ingested_at"].tzinfo is not None

    outbound = recs[out]
    assert outbound["direction"] == "outbound"
    assert [(p["address"], p["internal"]) for p in outbound["participants"]] == [(OURS, True), (CUSTOMER, False)]
    assert outbound["call"]["price"] == "-0.0130"
    assert outbound["content"] == "Outbound call, 45 s, completed"

    state = await memory_store.load_state("support")
    assert state == {"calls": {"cursor": (T0 + minutes(200)).isoformat()}}


async def test_a_poll_stops_paging_at_the_edge_of_its_window(fake, memory_store):
    # 30 calls the same day, 10 minutes apart: far more than one lookback.
    for i in range(30):
        add_call(fake, T0 + minutes(10 * i))
    newest = T0 + minutes(290)
    settings = settings_for(account(fake, page_size=5, lookback="30m", channels=["calls"]))
    assert (await sync(settings, memory_store))[0]
    assert len(calls_requests(fake)) == 6

    fake.clear_requests()
    new = [add_call(fake, newest + minutes(5)), add_call(fake, newest + minutes(10))]
    ok, _, sink = await sync(settings, memory_store)
    assert ok

    reqs = calls_requests(fake)
    # Page 1: +10, +5, newest, -10, -20; page 2: -30 (the window's edge), -40 (older): stop.
    assert len(reqs) == 2, [r.url for r in reqs]
    assert reqs[0].query == {"StartTime>": (newest - minutes(30)).date().isoformat(), "PageSize": "5"}
    assert all(r.status == 200 for r in reqs)
    # The day holds 32 calls: a third page existed and was not asked for.
    assert [b[2] for b in sink.batches] == [5, 1]
    assert (await memory_store.load_state("support"))["calls"]["cursor"] == (newest + minutes(10)).isoformat()
    assert set(new) <= set(await records_by_id(memory_store))
    assert await memory_store.records.count_documents({}) == 32


async def test_a_call_in_progress_is_recorded_once_it_has_ended_with_its_final_values(fake, memory_store):
    earlier = add_call(fake, T0 - minutes(60))
    live = fake.add_call(ACC, start_time=T0, from_=CUSTOMER, to=OURS, status="in-progress")["sid"]
    later = add_call(fake, T0 + minutes(10))
    settings = settings_for(account(fake, channels=["calls"]))

    assert (await sync(settings, memory_store))[0]
    assert set(await records_by_id(memory_store)) == {earlier, later}
    # The open call holds the cursor back, so the next poll reads it again.
    assert (await memory_store.load_state("support"))["calls"]["cursor"] == T0.isoformat()

    fake.update_call(live, status="completed", duration=252)
    assert (await sync(settings, memory_store))[0]
    recs = await records_by_id(memory_store)
    assert set(recs) == {earlier, live, later}
    assert recs[live]["call"]["status"] == "completed" and recs[live]["call"]["duration_s"] == 252
    assert recs[live]["content"] == "Inbound call, 4 min 12 s, completed"
    assert recs[live]["call"]["price"] is None
    assert (await memory_store.load_state("support"))["calls"]["cursor"] == (T0 + minutes(10)).isoformat()

    # The price arrives after the call has ended: a re-read within lookback sets it in place.
    first_seen = recs[live]["ingested_at"]
    fake.update_call(live, price="-0.0260")
    assert (await sync(settings, memory_store))[0]
    recs = await records_by_id(memory_store)
    assert len(recs) == 3
    assert recs[live]["call"]["price"] == "-0.0260"
    assert recs[live]["ingested_at"] == first_seen
    assert len(recs[live]["sources"]) == 1


async def test_a_call_with_child_legs_is_one_record(fake, memory_store):
    agent_desk, agent_cell = "+14155550180", "+14155550181"
    parent = add_call(fake, T0, duration=300)
    rang = add_call(fake, T0 + timedelta(seconds=2), frm=OURS, to=agent_desk, direction="outbound-dial",
                    parent_call_sid=parent, status="no-answer", duration=0)
    talked = add_call(fake, T0 + timedelta(seconds=20), frm=CUSTOMER, to=agent_cell, direction="outbound-dial",
                      parent_call_sid=parent, duration=250)
    other = add_call(fake, T0 + minutes(60))
    rec1 = fake.add_recording(ACC, parent, date_created=T0 + timedelta(seconds=5), duration=295)
    rec2 = fake.add_recording(ACC, talked, date_created=T0 + timedelta(seconds=21), duration=249)
    # page_size 1: the legs arrive on pages before their parent's.
    settings = settings_for(account(fake, page_size=1, channels=["calls"], numbers=[agent_desk]))

    ok, runner, sink = await sync(settings, memory_store)

    assert ok, runner.status
    recs = await records_by_id(memory_store)
    assert set(recs) == {parent, other}
    call = recs[parent]
    assert call["call"]["legs"] == [rang, talked]
    assert [r["sid"] for r in call["call"]["recordings"]] == [rec1["sid"], rec2["sid"]]
    assert call["call"]["recordings"][0] == {
        "sid": rec1["sid"],
        "duration_s": 295,
        "media_path": f"/2010-04-01/Accounts/{ACC}/Recordings/{rec1['sid']}",
    }
    assert call["content"] == "Inbound call, 5 min, completed, 2 recordings"
    # The staff desk phone is ours (configured); the dialed cell is a party like any other.
    assert [(p["address"], p["internal"]) for p in call["participants"]] == [
        (CUSTOMER, False), (OURS, True), (agent_desk, True), (agent_cell, False),
    ]
    # Account recordings are read alongside the calls: one request, not one per call.
    assert len(fake.requests_to("/Recordings.json")) == 1
    assert not [r for r in fake.requests if "/Calls/CA" in r.path]


async def test_legs_of_a_call_that_began_before_the_window_keep_their_full_record(fake, memory_store):
    parent = add_call(fake, T0, duration=3 * 3600)
    first_leg = add_call(fake, T0 + timedelta(seconds=5), frm=OURS, to="+14155550180", direction="outbound-dial",
                         parent_call_sid=parent, duration=600)
    late_leg = add_call(fake, T0 + minutes(170), frm=OURS, to="+14155550181", direction="outbound-dial",
                        parent_call_sid=parent, duration=590)
    fake.add_recording(ACC, parent, date_created=T0 + timedelta(seconds=6), duration=10000)
    settings = settings_for(account(fake, lookback="1h", channels=["calls"]))
    assert (await sync(settings, memory_store))[0]
    assert (await records_by_id(memory_store))[parent]["call"]["legs"] == [first_leg, late_leg]

    # Next poll: the window (cursor - 1h) holds the late leg but not its parent.
    fake.clear_requests()
    assert (await sync(settings, memory_store))[0]
    recs = await records_by_id(memory_store)
    assert set(recs) == {parent}
    assert recs[parent]["call"]["legs"] == [first_leg, late_leg]
    assert len(recs[parent]["call"]["recordings"]) == 1
    # The parent was fetched with all its legs, once.
    assert [r.path.rsplit("/", 1)[-1] for r in fake.requests if r.path.endswith(f"{parent}.json")] == [f"{parent}.json"]
    assert [r.query for r in fake.requests_to("/Calls.json") if "ParentCallSid" in r.query] == [
        {"ParentCallSid": parent, "PageSize": "500"}
    ]
    assert [r.query for r in fake.requests_to("/Recordings.json") if "CallSid" in r.query] == [{"CallSid": parent, "PageSize": "100"}]


async def test_a_recording_added_after_the_call_is_picked_up_within_lookback(fake, memory_store):
    sid = add_call(fake, T0, duration=120)
    settings = settings_for(account(fake, channels=["calls"]))
    assert (await sync(settings, memory_store))[0]
    assert (await records_by_id(memory_store))[sid]["call"]["recordings"] == []
    rec = fake.add_recording(ACC, sid, date_created=T0 + minutes(3), duration=118)
    assert (await sync(settings, memory_store))[0]
    record = (await records_by_id(memory_store))[sid]
    assert [r["sid"] for r in record["call"]["recordings"]] == [rec["sid"]]
    assert record["content"] == "Inbound call, 2 min, completed, 1 recording"


async def test_whatsapp_sms_mms_and_unicode_bodies(fake, memory_store):
    texts = {
        "sms": "Grüße aus Köln – ça va? 你好 👋🏽",
        "wa": "مرحبا بك 🇩🇪 e\u0301",
        "mms": "",
    }
    sms = fake.add_message(ACC, from_=CUSTOMER, to=OURS, body=texts["sms"], direction="inbound", date_sent=T0, num_segments="2")["sid"]
    wa = fake.add_message(ACC, from_=f"whatsapp:{OURS}", to=f"whatsapp:{CUSTOMER}", body=texts["wa"],
                          direction="outbound-reply", date_sent=T0 + minutes(1), status="read", price="-0.0050")["sid"]
    mms = fake.add_message(ACC, from_=CUSTOMER, to=OURS, body=texts["mms"], direction="inbound",
                           date_sent=T0 + minutes(2), num_media="2", sid="MM" + "a" * 32)["sid"]
    await memory_store.customers.insert_one({"_id": "c", "phones": ["(415) 555-0100"]})
    settings = settings_for(account(fake, channels=["messages"]))

    ok, runner, _ = await sync(settings, memory_store)

    assert ok, runner.status
    recs = await records_by_id(memory_store)
    assert (recs[sms]["channel"], recs[sms]["direction"], recs[sms]["content"]) == ("sms", "inbound", texts["sms"])
    assert recs[sms]["message"] == {"status": "received", "num_media": 0, "num_segments": 2, "price": None, "price_unit": "USD"}
    assert (recs[wa]["channel"], recs[wa]["direction"], recs[wa]["content"]) == ("whatsapp", "outbound", texts["wa"])
    assert [(p["role"], p["address"], p["internal"]) for p in recs[wa]["participants"]] == [
        ("from", OURS, True), ("to", CUSTOMER, False),
    ]
    assert recs[wa]["message"]["price"] == "-0.0050" and recs[wa]["message"]["status"] == "read"
    assert (recs[mms]["channel"], recs[mms]["message"]["num_media"], recs[mms]["content"]) == ("sms", 2, "")
    assert recs[sms]["sources"] == [{"kind": "twilio", "source": "support", "account_sid": ACC, "list": "messages"}]
    assert all(r["customer_ids"] == ["c"] for r in recs.values())
    assert all(r["thread_id"] == CUSTOMER for r in recs.values())
    hist = await memory_store.history.find_one({"_id": "c"})
    assert hist["channels"]["sms"]["count"] == 2 and hist["channels"]["whatsapp"]["count"] == 1
    assert fake.requests_to("/Messages.json")[0].query == {"DateSent>": "2025-03-01", "PageSize": "500"}


async def test_message_status_and_price_change_in_place_and_queued_ones_come_when_sent(fake, memory_store):
    sent = fake.add_message(ACC, from_=OURS, to=CUSTOMER, body="on its way", status="sent", date_sent=T0)["sid"]
    queued = fake.add_message(ACC, from_=OURS, to=CUSTOMER, body="later", status="queued", date_created=T0 + minutes(1))["sid"]
    settings = settings_for(account(fake, channels=["messages"]))
    assert (await sync(settings, memory_store))[0]
    assert set(await records_by_id(memory_store)) == {sent}

    fake.update_message(sent, status="delivered", price="-0.0079")
    fake.update_message(queued, status="delivered", date_sent=T0 + minutes(2))
    assert (await sync(settings, memory_store))[0]
    recs = await records_by_id(memory_store)
    assert set(recs) == {sent, queued}
    assert recs[sent]["message"]["status"] == "delivered" and recs[sent]["message"]["price"] == "-0.0079"
    assert recs[queued]["occurred_at"] == T0 + minutes(2)


async def test_numbers_in_odd_formats_match_customers_stored_in_other_formats(fake, memory_store):
    await memory_store.customers.insert_many(
        [
            {"_id": "dashes", "phones": ["+1 415-555-0101"]},
            {"_id": "national", "phones": ["(415) 555-0102"]},
            {"_id": "digits", "phones": ["4155550103"]},
            {"_id": "idd", "phones": ["001 415 555 0104"]},
            {"_id": "wa", "phones": ["whatsapp:+14155550105"]},
            {"_id": "int", "phones": [4155550106]},
            {"_id": "uk", "name": "intl number, national digits of the region would not match", "phones": ["+44 20 7946 0018"]},
            {"_id": "uk-national", "phones": ["020 7946 0019"]},  # national GB: not readable with default_region US
            {"_id": "scalar", "phones": "+1.415.555.0107"},
            {"_id": "both", "emails": ["x@example.com"], "phones": ["+14155550101", "bad number"]},
            {"_id": "us", "phones": [OURS]},  # a CRM entry for our own line never becomes a contact
        ]
    )
    seen_as = {
        "+14155550101": "dashes",
        "(415) 555-0102": "national",  # written nationally by a SIP trunk
        "+14155550103": "digits",
        "+1 415 555 0104": "idd",
        "whatsapp:+14155550105": "wa",
        "+14155550106": "int",
        "+442079460018": "uk",
        "+442079460019": "uk-national",
        "+14155550107": "scalar",
    }
    sids = {}
    for i, (number, key) in enumerate(seen_as.items()):
        if number.startswith("whatsapp:"):
            sids[key] = fake.add_message(ACC, from_=number, to=f"whatsapp:{OURS}", body="hi", direction="inbound",
                                         date_sent=T0 + minutes(i))["sid"]
        else:
            sids[key] = add_call(fake, T0 + minutes(i), frm=number)
    settings = settings_for(account(fake))

    assert (await sync(settings, memory_store))[0]

    recs = await records_by_id(memory_store)
    got = {key: recs[sid]["customer_ids"] for key, sid in sids.items()}
    assert got == {
        "dashes": ["both", "dashes"],
        "national": ["national"],
        "digits": ["digits"],
        "idd": ["idd"],
        "wa": ["wa"],
        "int": ["int"],
        "uk": ["uk"],
        "uk-national": [],
        "scalar": ["scalar"],
    }
    assert recs[sids["national"]]["participants"][0]["address"] == "+14155550102"
    assert await memory_store.history.count_documents({"_id": "us"}) == 0


async def test_bad_phone_numbers_are_kept_as_written_and_never_fatal(fake, memory_store):
    odd = ["Anonymous", "+266696687", "client:alice", "12", "", "sip:bob@pbx.example", "+1 41"]
    sids = {raw: add_call(fake, T0 + minutes(i), frm=raw) for i, raw in enumerate(odd)}
    await memory_store.customers.insert_one({"_id": "c", "phones": ["12", "Anonymous"]})
    settings = settings_for(account(fake, channels=["calls"]))
    with capture_logs() as logs:
        ok, runner, _ = await sync(settings, memory_store)
    assert ok, runner.status
    recs = await records_by_id(memory_store)
    assert len(recs) == len(odd)
    for raw, sid in sids.items():
        caller = recs[sid]["participants"][0]
        assert caller["address"] == raw.strip()
        assert recs[sid]["customer_ids"] == []
    assert recs[sids["client:alice"]]["participants"][0]["internal"] is True
    kept = {e["number"] for e in logs if e["event"] == "number_kept_as_written"}
    assert {"12", "+266696687"} <= kept and "client:alice" not in kept and "Anonymous" not in kept


async def test_malformed_items_are_skipped_with_a_reason_and_counted(fake, memory_store):
    for i in range(4):
        add_call(fake, T0 + minutes(i))
    for i in range(3):
        fake.add_message(ACC, from_=CUSTOMER, to=OURS, body=f"m{i}", direction="inbound", date_sent=T0 + minutes(i))
    fake.malformed_next("/Calls.json", kind="missing_sid", index=0)
    fake.malformed_next("/Calls.json", kind="bad_date", index=1)  # the same page: both faults apply in turn
    fake.malformed_next("/Messages.json", kind="not_object", index=2)
    settings = settings_for(account(fake, page_size=2))
    with capture_logs() as logs:
        ok, runner, sink = await sync(settings, memory_store)
    assert ok, runner.status
    skipped = [e for e in logs if e["event"] == "item_skipped"]
    reasons = sorted(e["reason"] for e in skipped)
    assert reasons == ["no valid call sid", "not an object", "unparseable start_time 'not-a-date'"]
    assert sum(b[3] for b in sink.batches) == 3
    assert await memory_store.records.count_documents({"channel": "call"}) == 2
    assert await memory_store.records.count_documents({"channel": "sms"}) == 2


# -- errors ------------------------------------------------------------------------------------


async def test_429_is_retried_after_retry_after_and_the_pass_succeeds(fake, memory_store):
    for i in range(3):
        add_call(fake, T0 + minutes(i))
    fake.fail_next(1, 429, retry_after=1, path="/Calls.json", skip=1)  # the second page
    settings = settings_for(account(fake, page_size=2, channels=["calls"]))
    started = time.monotonic()
    with capture_logs() as logs:
        ok, runner, _ = await sync(settings, memory_store)
    assert ok, runner.status
    reqs = calls_requests(fake)
    assert [r.status for r in reqs] == [200, 429, 200]
    assert reqs[1].query == reqs[2].query  # the same page again, not the pass from the start
    assert (reqs[2].time - reqs[1].time).total_seconds() >= 0.9
    assert time.monotonic() - started >= 0.9
    assert [e["wait_s"] for e in logs if e["event"] == "rate_limited"] == [1.0]
    assert await memory_store.records.count_documents({}) == 3


async def test_429_without_end_fails_the_pass_for_the_runner_to_back_off(fake, memory_store):
    add_call(fake, T0)
    fake.fail_next(10, 429, retry_after=0, path="/Calls.json")
    settings = settings_for(account(fake, channels=["calls"]))
    ok, runner, _ = await sync(settings, memory_store)
    assert not ok
    assert "TwilioUnavailable" in runner.status["support"].last_error and "HTTP 429" in runner.status["support"].last_error
    assert len(calls_requests(fake)) == 5


async def test_a_5xx_mid_pass_fails_it_and_the_next_pass_resumes_below_what_was_stored(fake, memory_store):
    sids = [add_call(fake, T0 + minutes(i)) for i in range(6)]
    fake.fail_next(1, 503, path="/Calls.json", skip=1)
    settings = settings_for(account(fake, page_size=2, channels=["calls"]))
    ok, runner, _ = await sync(settings, memory_store)
    assert not ok and "HTTP 503" in runner.status["support"].last_error
    assert await memory_store.records.count_documents({}) == 2
    state = (await memory_store.load_state("support"))["calls"]
    assert state["cursor"] is None and state["pass"]["below"] == (T0 + minutes(4)).isoformat()

    fake.clear_requests()
    ok, runner, _ = await sync(settings, memory_store)
    assert ok, runner.status
    # Resumed: bounded above by the day of what was stored, and the two stored calls are not written again.
    assert calls_requests(fake)[0].query == {"StartTime>": "2025-03-01", "StartTime<": "2025-03-04", "PageSize": "2"}
    assert set(await records_by_id(memory_store)) == set(sids)
    assert (await memory_store.load_state("support"))["calls"] == {"cursor": (T0 + minutes(5)).isoformat()}


async def test_messages_in_the_second_a_pass_was_cut_in_are_not_lost(fake, memory_store):
    # Four messages in the same second across two pages; the pass dies after the first page.
    sids = {fake.add_message(ACC, from_=CUSTOMER, to=OURS, body=f"m{i}", direction="inbound", date_sent=T0)["sid"] for i in range(4)}
    fake.fail_next(1, 503, path="/Messages.json", skip=1)
    settings = settings_for(account(fake, page_size=2, channels=["messages"]))
    assert not (await sync(settings, memory_store))[0]
    assert await memory_store.records.count_documents({}) == 2
    assert (await sync(settings, memory_store))[0]
    assert set(await records_by_id(memory_store)) == sids


async def test_connection_errors_fail_the_pass_without_touching_the_checkpoint(fake, memory_store):
    add_call(fake, T0)
    fake.disconnect_next(1, path="/Calls.json")
    settings = settings_for(account(fake, channels=["calls"]))
    ok, runner, _ = await sync(settings, memory_store)
    assert not ok and "TwilioUnavailable" in runner.status["support"].last_error
    assert await memory_store.load_state("support") == {}
    assert (await sync(settings, memory_store))[0]
    assert await memory_store.records.count_documents({}) == 1


async def test_401_fails_that_account_while_another_account_and_a_mailbox_keep_syncing(fake, dovecot, imap_user, memory_store):
    add_call(fake, T0, acc=ACC)
    add_call(fake, T0, acc=ACC2, frm="+14155550111", to="+14155550198")
    for i in range(2):
        dovecot.append(imap_user.name, "INBOX", message(i))
    mailbox = dovecot.mailbox(imap_user, name="mail", folders=["INBOX"])
    settings = settings_for(
        account(fake, "support", ACC, "wrong-token"),
        account(fake, "sales", ACC2, TOKEN2),
        mailboxes=[mailbox],
    )
    ok, runner, _ = await sync(settings, memory_store)
    assert not ok
    error = runner.status["support"].last_error
    assert "CredentialsRefused" in error and "credentials refused" in error and ACC in error and "HTTP 401" in error
    assert "wrong-token" not in error
    assert runner.status["sales"].last_error is None and runner.status["mail"].last_error is None
    recs = await memory_store.records.find().to_list(None)
    assert sorted(r["channel"] for r in recs) == ["call", "email", "email"]
    assert [s["source"] for r in recs for s in r["sources"] if s["kind"] == "twilio"] == ["sales"]


async def test_403_is_an_auth_failure_with_a_clear_reason(fake, memory_store):
    fake.fail_next(1, 403, path="/Messages.json")
    settings = settings_for(account(fake, channels=["messages"]))
    ok, runner, _ = await sync(settings, memory_store)
    assert not ok
    status = runner.status["support"]
    # PermissionDenied is a CredentialsRefused: the runner counts it as a refusal.
    assert "PermissionDenied" in status.last_error and "permission denied" in status.last_error and status.refusals == 1


async def test_check_tells_403_from_401_by_status_not_by_the_error_text(fake):
    (connector,) = app.build_connectors(settings_for(account(fake)), None)
    try:
        # A 403 is a PermissionDenied (still a CredentialsRefused): check falls back to one page per list.
        fake.fail_next(1, 403, path=f"/Accounts/{ACC}.json")
        assert "readable" in await connector.check()
        fake.fail_next(1, 403, path=f"/Accounts/{ACC}.json")
        with pytest.raises(PermissionDenied):
            await connector._request("fetch account", (await connector._call(connector._account)).fetch)
        # A 401 whose message happens to mention "HTTP 403" is refused credentials: no fallback.
        body = {"code": 20003, "message": "Authenticate (HTTP 403 on the old API)", "status": 401, "more_info": ""}
        fake.fail_next(1, 401, path=f"/Accounts/{ACC}.json", body=body)
        lists_before = sum(1 for r in fake.requests if r.path.endswith(("/Calls.json", "/Messages.json")))
        with pytest.raises(CredentialsRefused) as refused:
            await connector.check()
        assert not isinstance(refused.value, PermissionDenied) and str(refused.value).startswith("fetch account")
        assert sum(1 for r in fake.requests if r.path.endswith(("/Calls.json", "/Messages.json"))) == lists_before
    finally:
        await connector.aclose()


async def test_a_200_that_is_not_json_is_unavailable_and_described(fake):
    (connector,) = app.build_connectors(settings_for(account(fake)), None)
    fake.fail_next(1, 200, path=f"/Accounts/{ACC}.json", body="<html>a proxy's error page</html>")
    try:
        with pytest.raises(TwilioUnavailable) as exc:
            await connector.check()
    finally:
        await connector.aclose()
    # Described as every other error is: the class says what kind of unreadable.
    assert str(exc.value).startswith("fetch account: unreadable response: JSONDecodeError: ")


async def test_api_key_credentials_from_a_file(fake, memory_store, tmp_path):
    key, secret = fake.add_api_key(ACC)
    path = tmp_path / "twilio-key"
    path.write_text(secret + "\n")
    add_call(fake, T0)
    settings = settings_for({**account(fake, channels=["calls"]), "auth_token": None, "api_key_sid": key, "api_key_secret_file": str(path)})
    ok, runner, _ = await sync(settings, memory_store)
    assert ok, runner.status
    assert {r.auth_user for r in fake.requests} == {key}


async def test_restart_in_the_middle_loses_and_doubles_nothing(fake, memory_store):
    await memory_store.customers.insert_one({"_id": "c", "phones": ["415-555-0100"]})
    sids = [add_call(fake, T0 + minutes(10 * i), duration=60 + i) for i in range(7)]
    parent = sids[3]
    leg = add_call(fake, T0 + minutes(31), frm=OURS, to="+14155550180", direction="outbound-dial", parent_call_sid=parent)
    for i in range(4):
        fake.add_message(ACC, from_=CUSTOMER, to=OURS, body=f"msg {i}", direction="inbound", date_sent=T0 + minutes(i))
    settings = settings_for(account(fake, page_size=3))
    ok, runner, _ = await sync(settings, memory_store, sink=CrashingSink(memory_store, after=1))
    assert not ok and "injected" in runner.status["support"].last_error
    assert "pass" in (await memory_store.load_state("support"))["calls"]

    fake.clear_requests()
    ok, runner, _ = await sync(settings, memory_store)
    assert ok, runner.status
    assert "StartTime<" in calls_requests(fake)[0].query  # resumed, not started over
    recs = await records_by_id(memory_store)
    assert await memory_store.records.count_documents({"channel": "call"}) == 7
    assert await memory_store.records.count_documents({"channel": "sms"}) == 4
    assert leg not in recs and recs[parent]["call"]["legs"] == [leg]
    assert all(len(r["sources"]) == 1 for r in recs.values())
    hist = await memory_store.history.find_one({"_id": "c"})
    assert hist["total"] == 11
    assert _strip(hist) == _strip((await memory_store.rebuild_history())["c"])
    state = await memory_store.load_state("support")
    assert state == {"calls": {"cursor": (T0 + minutes(60)).isoformat()}, "messages": {"cursor": (T0 + minutes(3)).isoformat()}}


async def test_a_resumed_pass_keeps_the_legs_of_the_call_it_resumes_at(fake, memory_store):
    # The parent ends page 1 just before midnight; its leg starts after midnight, beyond the
    # resumed query's day bound, so it must be listed by ParentCallSid rather than lost.
    parent_at = datetime(2025, 3, 3, 23, 59, 50, tzinfo=UTC)
    add_call(fake, parent_at + minutes(60))
    parent = add_call(fake, parent_at, duration=300)
    leg = add_call(fake, parent_at + timedelta(seconds=20), frm=OURS, to="+14155550180", direction="outbound-dial",
                   parent_call_sid=parent, duration=250)
    for hours_before in (4, 5, 6, 7):
        add_call(fake, parent_at - minutes(60 * hours_before))
    settings = settings_for(account(fake, page_size=3, channels=["calls"]))

    class Crash(CountingSink):
        async def save_checkpoint(self, source, stream, checkpoint):
            if "pass" in checkpoint and checkpoint["pass"]["floor"] != parent_at.isoformat():
                raise RuntimeError("injected: died after storing page 2")
            await super().save_checkpoint(source, stream, checkpoint)

    ok, runner, _ = await sync(settings, memory_store, sink=Crash(memory_store))
    assert not ok and "injected" in runner.status["support"].last_error
    assert (await records_by_id(memory_store))[parent]["call"]["legs"] == [leg]

    fake.clear_requests()
    ok, runner, sink = await sync(settings, memory_store)
    assert ok, runner.status
    assert calls_requests(fake)[0].query["StartTime<"] == "2025-03-04"
    assert (await records_by_id(memory_store))[parent]["call"]["legs"] == [leg]
    assert [r.query["ParentCallSid"] for r in fake.requests_to("/Calls.json") if "ParentCallSid" in r.query] == [parent]
    assert await memory_store.records.count_documents({}) == 6


async def test_history_counts_calls_talk_time_and_texts_beside_email(fake, memory_store):
    await memory_store.customers.insert_one({"_id": "c", "emails": ["alice@example.com"], "phones": ["+1 (415) 555-0100"]})
    add_call(fake, T0, duration=252)
    add_call(fake, T0 + minutes(10), frm=OURS, to=CUSTOMER, direction="outbound-api", duration=48)
    add_call(fake, T0 + minutes(20), status="no-answer", duration=0)
    fake.add_message(ACC, from_=CUSTOMER, to=OURS, body="hi", direction="inbound", date_sent=T0 + minutes(30))
    fake.add_message(ACC, from_=OURS, to=CUSTOMER, body="hello", date_sent=T0 + minutes(40))
    await memory_store.write_batch([email_record("mail@x", at=T0 + minutes(50))])
    settings = settings_for(account(fake))

    assert (await sync(settings, memory_store))[0]

    hist = await memory_store.history.find_one({"_id": "c"})
    assert hist["channels"]["call"]["count"] == 3
    assert hist["channels"]["call"]["talk_seconds"] == 300
    assert hist["channels"]["sms"]["count"] == 2
    assert hist["channels"]["email"]["count"] == 1
    assert (hist["total"], hist["inbound"], hist["outbound"]) == (6, 4, 2)
    assert (hist["last_channel"], hist["last_at"]) == ("email", T0 + minutes(50))
    assert _strip(hist) == _strip((await memory_store.rebuild_history())["c"])


async def test_the_event_loop_is_never_blocked_by_a_slow_request(fake):
    add_call(fake, T0)
    fake.delay_next(1, 0.5, path="/Calls.json")
    connector = TwilioConnector(settings_for(account(fake, channels=["calls"])).twilio_accounts[0])
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        batches = [b async for b in connector.batches({})]
    finally:
        task.cancel()
        await connector.aclose()
    assert sum(len(b.records) for b in batches) == 1
    assert ticks >= 20


# -- config, secrets, CLI -------------------------------------------------------------------


def _write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_issue_example_config_loads(tmp_path):
    secret = tmp_path / "twilio"
    secret.write_text("token-from-file\n")
    path = _write(
        tmp_path,
        f"""
default_region: US
twilio_accounts:
  - name: support
    account_sid: AC0123456789abcdef0123456789abcdef
    auth_token_file: {secret}
    channels: [calls, messages]
    since: 2024-01-01
    lookback: 2h
    base_url: https://api.twilio.com
""",
    )
    s = load_settings(path)
    acc = s.twilio_accounts[0]
    assert s.default_region == "US"
    assert acc.lookback == timedelta(hours=2) and acc.since.isoformat() == "2024-01-01"
    assert acc.read_credentials() == ("AC0123456789abcdef0123456789abcdef", "token-from-file")
    assert 200 <= acc.page_size <= 1000 and acc.poll_interval is None
    assert [c.name for c in app.build_connectors(s, None)] == ["support"]


@pytest.mark.parametrize(
    ("account_keys", "expected"),
    [
        ({"auth_token": None}, "twilio_accounts[0](t): set exactly one of auth_token"),
        ({"auth_token_env": "X"}, "set exactly one of auth_token, auth_token_file, auth_token_env (or api_key_sid"),
        ({"api_key_sid": "SK" + "0" * 32}, "use either the auth token or an API key"),
        ({"auth_token": None, "api_key_sid": "SK" + "0" * 32}, "api_key_sid needs exactly one of api_key_secret"),
        ({"api_key_secret": "s"}, "api_key_secret needs api_key_sid"),
        ({"account_sid": "AC123"}, "twilio_accounts[0](t).account_sid: String should match pattern"),
        ({"auth_token": None, "api_key_sid": "AK1", "api_key_secret": "s"}, "twilio_accounts[0](t).api_key_sid:"),
        ({"channels": ["calls", "faxes"]}, "twilio_accounts[0](t).channels[1]:"),
        ({"channels": []}, "twilio_accounts[0](t).channels:"),
        ({"lookback": "40d"}, "lookback must be between 0 and 31 days"),
        ({"lookback": "soon"}, "twilio_accounts[0](t).lookback:"),
        ({"since": "last year"}, "twilio_accounts[0](t).since:"),
        ({"base_url": "api.twilio.com"}, "base_url must be an http(s) URL"),
        ({"page_size": 5000}, "twilio_accounts[0](t).page_size:"),
        ({"numbers": ["555-0100"]}, "'555-0100' is not a phone number in international form"),
        ({"auth_token": None, "auth_token_file": "/nonexistent/tok"}, "cannot read /nonexistent/tok"),
        ({"auht_token": "x"}, "twilio_accounts[0](t).auht_token: unknown key"),
    ],
)
def test_bad_twilio_config_names_file_key_and_reason(tmp_path, account_keys, expected):
    acc = {"name": "t", "account_sid": ACC, "auth_token": "Secret-Do-Not-Echo", **account_keys}
    acc = {k: v for k, v in acc.items() if v is not None}
    path = _write(tmp_path, {"twilio_accounts": [acc]})
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)
    assert "Secret-Do-Not-Echo" not in str(err.value)


def test_bad_region_and_names_shared_with_a_mailbox(tmp_path):
    with pytest.raises(ConfigError, match="default_region: 'XX' is not a region code"):
        load_settings(_write(tmp_path, {"default_region": "xx"}))
    shared = {
        "mailboxes": [{"name": "support", "host": "h", "username": "u", "password": "p"}],
        "twilio_accounts": [{"name": "support", "account_sid": ACC, "auth_token": "t"}],
    }
    with pytest.raises(ConfigError, match="source name 'support' is used twice"):
        load_settings(_write(tmp_path, shared))


def test_example_config_twilio_section_is_valid_once_uncommented(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "config" / "example.yaml").read_text()
    start = text.index("# default_region:")
    uncommented = re.sub(r"(?m)^# (?=default_region|twilio_accounts| )", "", text[start:])
    monkeypatch.setenv("COMMSYNC_EXAMPLE_PASSWORD", "x")
    monkeypatch.setenv("COMMSYNC_EXAMPLE_TWILIO_TOKEN", "x")
    s = load_settings(_write(tmp_path, text[:start] + uncommented))
    assert s.default_region == "US"
    acc = s.twilio_accounts[0]
    assert (acc.name, acc.lookback, acc.numbers) == ("support", timedelta(hours=2), ["+14155550180"])


def test_secrets_never_reach_logs_records_or_status(fake, tmp_path, capsys):
    add_call(fake, T0)
    fake.add_message(ACC, from_=CUSTOMER, to=OURS, body="hello", direction="inbound", date_sent=T0)
    config = _write(
        tmp_path,
        {
            "mongodb": {"uri": "memory://"},
            "log_level": "debug",
            "twilio_accounts": [account(fake), account(fake, "bad", ACC2, TOKEN)],  # the wrong account's token: 401
        },
    )
    assert main(["run", "--once", "-c", str(config)]) == 1
    assert main(["run", "--once", "--dry-run", "-c", str(config)]) == 1
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr()
    everything = out.out + out.err
    assert "credentials refused" in everything  # the failure is there, its secret is not
    assert '"channel": "call"' in out.out
    assert TOKEN not in everything and TOKEN2 not in everything
    settings = load_settings(config)
    assert TOKEN not in repr(settings) + str(settings)


def test_cli_dry_run_prints_twilio_records(fake, dovecot, imap_user, tmp_path, capsys):
    add_call(fake, T0, duration=30)
    fake.add_message(ACC, from_=CUSTOMER, to=OURS, body="Grüße 👋", direction="inbound", date_sent=T0)
    dovecot.append(imap_user.name, "INBOX", message(1))
    config = _write(
        tmp_path,
        {
            # An unreachable MongoDB proves the dry run never connects to it.
            "mongodb": {"uri": "mongodb://127.0.0.1:9", "server_selection_timeout": "1s"},
            "default_region": "US",
            "mailboxes": [
                dovecot.mailbox(imap_user, folders=["INBOX"])
            ],
            "twilio_accounts": [account(fake)],
        },
    )
    assert main(["run", "--once", "--dry-run", "-c", str(config)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(r["channel"] for r in lines) == ["call", "email", "sms"]
    sms = next(r for r in lines if r["channel"] == "sms")
    assert sms["content"] == "Grüße 👋" and sms["occurred_at"] == T0.isoformat()


def test_cli_check_prints_a_line_per_twilio_account(fake, tmp_path, capsys):
    key, secret = fake.add_api_key(ACC2)
    # Standard and Restricted API keys may not read the Account resource.
    fake.fail_next(1, 403, path=f"/Accounts/{ACC2}.json")
    config = _write(
        tmp_path,
        {
            "mongodb": {"uri": "memory://"},
            "twilio_accounts": [
                account(fake, "support"),
                {"name": "keyed", "account_sid": ACC2, "api_key_sid": key, "api_key_secret": secret, "base_url": fake.base_url},
                account(fake, "nope", ACC, "wrong"),
            ],
        },
    )
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "ok    twilio support" in out and "account ok: 'Support line' (active, Full)" in out
    assert "ok    twilio keyed" in out and "calls, messages readable" in out
    assert "FAIL  twilio nope" in out and "CredentialsRefused" in out and "credentials refused" in out
    assert "wrong" not in out.split("twilio nope", 1)[1].replace("wrong-", "")  # the bad token is not echoed
    account_fetches = [r for r in fake.requests if r.path.endswith(f"{ACC}.json")]
    assert len(account_fetches) == 2  # one cheap request per account


async def test_a_cursor_in_the_future_is_read_again_from_the_start(fake, memory_store):
    """A database restored from another system, or a clock that was wrong: items would fall before the cursor for ever."""
    for i in range(3):
        add_call(fake, T0 + minutes(i))
    future = datetime.now(UTC) + timedelta(days=30)
    await memory_store.save_checkpoint("support", "calls", {"cursor": future.isoformat()})
    settings = settings_for(account(fake, channels=["calls"]))
    with capture_logs() as logs:
        ok, runner, _ = await sync(settings, memory_store)
    assert ok and await memory_store.records.count_documents({}) == 3
    assert any(e["event"] == "cursor_in_future" for e in logs)
    assert "lies in the future" in runner.status["support"].problems["cursor:calls"]
    assert (await memory_store.load_state("support"))["calls"]["cursor"] == (T0 + minutes(2)).isoformat()


def test_a_cursor_ahead_of_the_clock_by_less_than_an_hour_stands():
    from commsync.connectors.twilio_window import Window

    now = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
    soon = now + timedelta(minutes=20)  # clocks of two machines a little apart
    w = Window.open({"cursor": soon.isoformat()}, since=None, lookback=timedelta(hours=2), now=now)
    assert w.cursor == soon and w.discarded is None
    far = now + timedelta(days=2)
    w = Window.open({"cursor": far.isoformat()}, since=None, lookback=timedelta(hours=2), now=now)
    assert w.cursor is None and w.start is None and w.discarded == far
