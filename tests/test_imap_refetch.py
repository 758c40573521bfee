"""IMAP refetch and inventory (quarantine retries, `verify --repair`) on a real Dovecot."""

from __future__ import annotations

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
