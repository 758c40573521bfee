"""IMAP refetch and inventory (quarantine retries, `verify --repair`) on a real Dovecot."""

from __future__ import annotations

import json

from commsync.config import settings_from_dict
from commsync.daemon import app

from mailgen import message


def connector_for(dovecot, user, capture=None, **mailbox):
    box = dovecot.mailbox(user, addresses=[f"{user.name}@ourco.example"]) | mailbox
    settings = settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [box], "capture": capture or {}})
    (connector,) = app.build_connectors(settings, None)
    return connector


async def test_refetch_is_bounded_by_bytes_as_well_as_count(dovecot, imap_user):
    sizes = {i + 1: len(message(i, attachment=bytes(300_000))) for i in range(6)}
    for i in range(6):
        dovecot.append(imap_user.name, "INBOX", message(i, attachment=bytes(300_000)))
    budget = 1024 * 1024
    connector = connector_for(dovecot, imap_user, folders=["INBOX"], batch_size=500, capture={"max_batch_bytes": budget})
    try:
        batches = [b async for b in connector.refetch("INBOX", None, [(uid, {}) for uid in sizes])]
    finally:
        await connector.aclose()
    chunks = [list(b.item_ids) for b in batches]
    assert sorted(uid for chunk in chunks for uid in chunk) == list(sizes)
    assert len(chunks) > 1
    assert all(sum(sizes[uid] for uid in chunk) <= budget for chunk in chunks)
    assert sum(len(b.records) for b in batches) == 6


# Header oddities real senders produce: an odd-cased name, the id folded onto the next
# line without angle brackets, a Latin-1 byte in it, and a second Message-ID header.
ODD_ID = (
    b"From: Alice <alice@example.com>\r\nTo: sales@ourco.example\r\nSubject: odd id\r\n"
    b"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
    b"mESSAGE-iD:\r\n\tcaf\xe9.1@Example.COM\r\nMessage-ID: <second@example.com>\r\n\r\nZebra invoice 77.\r\n"
)


def test_verify_reads_message_ids_as_capture_does(dovecot, imap_user, cli):
    # IMAP items are matched to records by UID; the Message-ID is what ties a server
    # message to a record deleted for good (a tombstone), so a different reading of it
    # would report a deleted message missing and let --repair bring it back.
    dovecot.append(imap_user.name, "INBOX", ODD_ID)
    dovecot.append(imap_user.name, "INBOX", message(1))
    box = dovecot.mailbox(imap_user, addresses=[f"{imap_user.name}@ourco.example"], folders=["INBOX"])
    cli.write(mailboxes=[box])
    assert cli("run", "--once")[0] == 0
    assert "café.1@example.com" in cli.db(lambda db: db.records.distinct("_id"))
    assert cli("records", "delete", "--text", "Zebra invoice", "--yes")[0] == 0
    assert "café.1@example.com" not in cli.db(lambda db: db.records.distinct("_id"))
    code, out = cli("verify", "--json")
    (report,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0, out
    assert (report["remote"], report["stored"], report["excluded"], report["missing"]) == (2, 1, {"deleted": 1}, [])
