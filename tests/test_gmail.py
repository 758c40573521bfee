"""Gmail's IMAP extension (X-GM-EXT-1): X-GM-MSGID is kept as a second identity, records stay one per Message-ID.

Dovecot plays Gmail through ``tests/gmail_proxy.py``, which advertises the
capability and answers X-GM-MSGID from Dovecot's own message GUIDs.
"""

from __future__ import annotations

import pytest

from commsync.config import settings_from_dict
from commsync.daemon import app
from commsync.daemon.runner import Runner, StoreSink

from gmail_proxy import GmailProxy
from mailgen import message


@pytest.fixture
def gmail(dovecot):
    with GmailProxy(dovecot.host, dovecot.port) as proxy:
        yield proxy


def settings_for(dovecot, user, folders, **box):
    """Settings for one mailbox "gmail": ``host``/``port`` of a proxy, else Dovecot itself."""
    return settings_from_dict(
        {
            "mongodb": {"uri": "memory://"},
            "mailboxes": [dovecot.mailbox(user, name="gmail", folders=folders, **box)],
            "daemon": {"parse_workers": 1},
        }
    )


async def test_labels_are_one_record_with_the_gmail_msgid_in_each_source(dovecot, imap_user, memory_store, gmail):
    raw = message(5, message_id="<labelled@example.com>")
    dovecot.append(imap_user.name, "INBOX", raw)
    dovecot.append(imap_user.name, "Customers", raw)  # a label: the same message in another folder
    dovecot.append(imap_user.name, "INBOX", message(6))
    runner = Runner(app.build_connectors(settings_for(dovecot, imap_user, ["INBOX", "Customers"], host=gmail.host, port=gmail.port), None), StoreSink(memory_store), once=True)
    assert await runner.run(), runner.status
    assert await memory_store.records.count_documents({}) == 2
    rec = await memory_store.records.find_one({"_id": "labelled@example.com"})
    assert sorted(s["folder"] for s in rec["sources"]) == ["Customers", "INBOX"]
    ids = [s["gmail_msgid"] for s in rec["sources"]]
    assert all(isinstance(i, str) and i.isdigit() for i in ids)
    other = await memory_store.records.find_one({"_id": {"$ne": "labelled@example.com"}})
    assert other["sources"][0]["gmail_msgid"] not in ids


async def test_servers_without_the_extension_are_not_asked(dovecot, imap_user, memory_store):
    dovecot.append(imap_user.name, "INBOX", message(1))
    runner = Runner(app.build_connectors(settings_for(dovecot, imap_user, ["INBOX"]), None), StoreSink(memory_store), once=True)
    # Dovecot would answer BAD to a FETCH of X-GM-MSGID: the pass succeeding shows it was not asked.
    assert await runner.run(), runner.status
    rec = await memory_store.records.find_one({})
    assert "gmail_msgid" not in rec["sources"][0]
