"""`commsync verify` against the real Dovecot and the Twilio fake, on mongomock and the real MongoDB server."""

from __future__ import annotations

import json

import pytest
import structlog

from commsync.daemon import verify

from mailgen import message


@pytest.fixture
def fake():
    from test_twilio_connector import ACC, TOKEN, FakeTwilio

    with FakeTwilio() as f:
        f.add_account(ACC, TOKEN, friendly_name="Support line")
        yield f


@pytest.fixture(autouse=True)
def _restore_structlog():
    # `main()` points structlog at pytest's captured stderr; later tests must not write to it once closed.
    yield
    structlog.reset_defaults()


def mailbox(dovecot, user, **extra):
    return dovecot.mailbox(user, addresses=[f"{user.name}@ourco.example"], folders=["INBOX"], **extra)


NEWSLETTER = (
    b"From: News <news@shop.example>\r\nTo: sales@ourco.example\r\nSubject: Weekly deals\r\n"
    b"Message-ID: <deals-1@shop.example>\r\nList-Unsubscribe: <mailto:u@shop.example>\r\nPrecedence: bulk\r\n\r\nBuy.\r\n"
)


def lines(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_verify_a_complete_mailbox_then_find_repair_and_prove_what_was_removed(dovecot, imap_user, cli):
    for i in range(6):
        dovecot.append(imap_user.name, "INBOX", message(i))
    dovecot.append(imap_user.name, "INBOX", NEWSLETTER)  # left out on purpose (automated), not missing
    cli.write(mailboxes=[mailbox(dovecot, imap_user)])
    assert (cli("run", "--once"))[0] == 0
    cli.db(lambda db: db.customers.insert_one({"_id": "c-alice", "emails": ["alice@example.com"]}))
    assert (cli("rematch"))[0] == 0

    code, out = cli("verify", "--json")
    (report,) = lines(out)
    assert code == 0, out
    assert (report["source"], report["stream"], report["remote"], report["stored"]) == ("m", "INBOX", 7, 6)
    assert report["excluded"] == {"automated": 1} and report["missing"] == [] and report["quarantined"] == 0

    # Two records vanish from the store behind capture's back.
    before = {d["_id"]: d for d in cli.db(lambda db: db.records.find().to_list(None))}
    gone = sorted(before)[:2]
    cli.db(lambda db: db.records.delete_many({"_id": {"$in": gone}}))
    code, out = cli("verify")
    assert code == 1 and out.startswith("FAIL  m INBOX: 4 stored, 1 excluded on purpose (automated: 1), 0 quarantined, 2 missing")
    for rid in gone:
        uid = next(s["uid"] for s in before[rid]["sources"])
        assert f"UID {uid} <{rid}>" in out

    code, out = cli("verify", "--repair", "--json")
    (report,) = lines(out)
    assert code == 0 and report["repaired"] == 2 and report["stored"] == 6 and report["missing"] == []
    after = {d["_id"]: d for d in cli.db(lambda db: db.records.find().to_list(None))}
    assert set(after) == set(before)
    for rid in gone:  # back as they were, ingested anew
        assert {k: v for k, v in after[rid].items() if k != "ingested_at"} == {k: v for k, v in before[rid].items() if k != "ingested_at"}
    stored = {d["_id"]: {k: v for k, v in d.items() if k != "updated_at"} for d in cli.db(lambda db: db.history.find().to_list(None))}
    rebuilt = {k: {f: v for f, v in d.items() if f != "updated_at"} for k, d in cli.db(lambda db: db.rebuild_history()).items()}
    assert stored == rebuilt and stored["c-alice"]["total"] == 6

    # The result is kept per stream for `commsync status` and the metrics.
    doc = cli.db(lambda db: db.source_status("m"))
    assert doc["verified"]["INBOX"]["missing"] == 0 and doc["verified"]["INBOX"]["stored"] == 6


def test_a_message_twice_in_a_folder_counts_under_both_uids(dovecot, imap_user, cli):
    """Two copies of one message (one Message-ID) read in one batch: one record, and both UIDs accounted for."""
    for raw in (message(1), message(1), NEWSLETTER, NEWSLETTER):
        dovecot.append(imap_user.name, "INBOX", raw)
    cli.write(mailboxes=[mailbox(dovecot, imap_user)])
    assert (cli("run", "--once"))[0] == 0
    assert cli.db(lambda db: db.records.count_documents({})) == 1
    code, out = cli("verify", "--json")
    (report,) = lines(out)
    assert code == 0, out
    assert (report["remote"], report["stored"], report["excluded"], report["missing"]) == (4, 2, {"automated": 2}, [])


def test_deleted_records_and_mail_gone_from_the_server_are_neither_missing_nor_stored(dovecot, imap_user, cli):
    for i in range(4):
        dovecot.append(imap_user.name, "INBOX", message(i))
    cli.write(mailboxes=[mailbox(dovecot, imap_user)])
    assert (cli("run", "--once"))[0] == 0
    ids = sorted(d["_id"] for d in cli.db(lambda db: db.records.find().to_list(None)))
    assert (cli("records", "delete", "--text", "Order 1000", "--yes"))[0] == 0  # deleted for good: a tombstone
    c = dovecot.client(imap_user.name)
    c.select_folder("INBOX")
    c.delete_messages([4])  # the last message leaves the server
    c.expunge()
    c.logout()

    code, out = cli("verify", "--json")
    (report,) = lines(out)
    assert code == 0, out
    assert report["stored"] == 2 and report["excluded"] == {"deleted": 1} and report["gone"] == 1
    assert report["gone_ids"] == [4] and len(ids) == 4
    # --repair marks the record's source entry gone: the contact stays, its place on the server is history.
    assert (cli("verify", "--repair"))[0] == 0
    record = cli.db(lambda db: db.records.find_one({"sources.uid": 4}))
    assert "gone_at" in record["sources"][0]


def test_verify_a_twilio_account(fake, cli):
    from test_twilio_connector import ACC, CUSTOMER, OURS, T0, account, add_call, minutes

    for i in range(5):
        add_call(fake, T0 + minutes(i))
    for i in range(3):
        fake.add_message(ACC, from_=CUSTOMER, to=OURS, body=f"m{i}", direction="inbound", date_sent=T0 + minutes(i))
    cli.write(twilio_accounts=[account(fake)])
    assert (cli("run", "--once"))[0] == 0
    code, out = cli("verify", "--json")
    reports = {r["stream"]: r for r in lines(out)}
    assert code == 0, out
    assert reports["calls"]["stored"] == 5 and reports["messages"]["stored"] == 3
    first = cli.db(lambda db: db.records.find({"channel": "sms"}).sort("_id", 1).to_list(None))[0]["_id"]
    cli.db(lambda db: db.records.delete_one({"_id": first}))
    code, out = cli("verify")
    assert code == 1 and f"missing: {first}" in out
    code, out = cli("verify", "--repair", "--source", "support")
    assert code == 0, out
    assert cli.db(lambda db: db.records.count_documents({"_id": first})) == 1


def test_compare_sorts_every_item_into_one_place():
    from commsync.connectors.base import RemoteItem

    remote = [
        RemoteItem(1, "a@x", "UID 1 <a@x>"),
        RemoteItem(2, "b@x", "UID 2 <b@x>"),
        RemoteItem(3, "c@x", "UID 3 <c@x>"),
        RemoteItem(4, "d@x", "UID 4 <d@x>"),
        RemoteItem(5, None, "UID 5 (no Message-ID)"),
        RemoteItem(6, "f@x", "UID 6 <f@x>", excluded="never started"),
    ]
    facts = verify.Facts(
        stored={1: {"record_id": "a@x", "gone": False}, 9: {"record_id": "z@x", "gone": False}},
        excluded={2: "automated"},
        quarantined=frozenset({3}),
        tombstoned=frozenset({"d@x"}),
    )
    report = verify.compare("m", "INBOX", remote, facts)
    assert (report.stored, report.quarantined, report.gone) == (1, 1, 1)
    assert report.excluded == {"automated": 1, "deleted": 1, "never started": 1}
    assert report.missing == ["UID 5 (no Message-ID)"] and report.missing_ids == [5] and report.gone_ids == [9]
    assert not report.ok
