"""Admin operations against a real Dovecot: what was deleted or forgotten stays out; policy on real mail."""

from __future__ import annotations

import pytest

from commsync.config import settings_from_dict
from commsync.connectors.mail import normalize_email
from commsync.daemon import admin, app, policy, queries
from commsync.daemon.runner import Runner, StoreSink

from mailgen import message
from seed import CORPUS, CORPUS_FILES, assert_histories_are_rebuild, expected_automated


def settings_for(dovecot, *users, folders=("INBOX",), **extra):
    boxes = [
        dovecot.mailbox(user, name=f"box-{user.name}", addresses=[f"{user.name}@ourco.example"], folders=list(folders))
        for user in users
    ]
    return settings_from_dict(
        {"mongodb": {"uri": "memory://"}, "internal_domains": ["ourco.example"], "mailboxes": boxes, "daemon": {"parse_workers": 1}, **extra}
    )


async def sync(settings, store):
    """One pass of the daemon's own capture path, with the configured capture policy."""
    store.capture = policy.from_settings(settings)
    runner = Runner(app.build_connectors(settings, None), StoreSink(store), once=True)
    ok = await runner.run()
    assert ok, runner.status
    return runner


async def ids(store):
    return sorted(d["_id"] for d in await store.records.find({}, {"_id": 1}).to_list(None))


async def test_deleted_records_never_come_back(dovecot, memory_store):
    a, b = dovecot.new_user("a"), dovecot.new_user("b")
    await memory_store.customers.insert_one({"_id": "c-alice", "emails": ["alice@example.com"]})
    raws = [message(i, message_id=f"<m{i}@mail.example.com>") for i in range(3)]
    for raw in raws:
        dovecot.append(a.name, "INBOX", raw)
    dovecot.append(b.name, "INBOX", raws[0])  # a second mailbox holds the same message
    only_a = settings_for(dovecot, a)
    await sync(only_a, memory_store)
    assert await ids(memory_store) == ["m0@mail.example.com", "m1@mail.example.com", "m2@mail.example.com"]

    done = await admin.delete(memory_store, queries.query(queries.Filters(participant=("alice@example.com",), text="1000")))
    assert done == admin.Selection(records=1, customers=1)
    assert (await memory_store.history.find_one({"_id": "c-alice"}))["total"] == 2

    # The folder is read from the start again after a UIDVALIDITY reset ...
    dovecot.reset_uidvalidity(a.name, "INBOX")
    await sync(only_a, memory_store)
    assert await ids(memory_store) == ["m1@mail.example.com", "m2@mail.example.com"]
    # ... and from another mailbox that holds the same message.
    await sync(settings_for(dovecot, a, b), memory_store)
    assert await ids(memory_store) == ["m1@mail.example.com", "m2@mail.example.com"]
    assert (await memory_store.history.find_one({"_id": "c-alice"}))["total"] == 2
    await assert_histories_are_rebuild(memory_store)


async def test_forgotten_customer_is_not_captured_again(dovecot, imap_user, memory_store):
    await memory_store.customers.insert_many(
        [{"_id": "c-alice", "emails": ["alice@example.com"]}, {"_id": "c-bob", "emails": ["bob@example.org"]}]
    )
    dovecot.append(imap_user.name, "INBOX", message(1))
    dovecot.append(imap_user.name, "INBOX", message(2, to=f"{imap_user.name}@ourco.example, bob@example.org"))
    settings = settings_for(dovecot, imap_user)
    await sync(settings, memory_store)
    assert await memory_store.records.count_documents({"customer_ids": "c-alice"}) == 2

    report = await admin.forget(memory_store, "c-alice")
    assert (report.deleted, report.unlinked, report.suppressed) == (1, 1, 1)

    dovecot.append(imap_user.name, "INBOX", message(3))  # Alice writes again
    dovecot.append(imap_user.name, "INBOX", message(4, to=f"{imap_user.name}@ourco.example, bob@example.org"))
    await sync(settings, memory_store)
    records = await memory_store.records.find().to_list(None)
    assert [r["subject"].split(":")[0] for r in sorted(records, key=lambda r: r["occurred_at"])] == ["Order 1002", "Order 1004"]
    for r in records:
        assert r["customer_ids"] == ["c-bob"]
        assert "alice@example.com" not in {p["address"] for p in r["participants"]}
    assert await memory_store.history.count_documents({"_id": "c-alice"}) == 0
    await assert_histories_are_rebuild(memory_store)


def _blocked(participants, addresses, domains):
    """The blocklist rule, restated: a blocked sender, or nobody but blocked people."""

    def hit(address):
        domain = address.rpartition("@")[2]
        return address in addresses or any(domain == d or domain.endswith("." + d) for d in domains)

    sender = [p["address"] for p in participants if p["role"] == "from"]
    return any(hit(a) for a in sender) or (bool(participants) and all(hit(p["address"]) for p in participants))


@pytest.mark.skipif(not CORPUS_FILES, reason=f"email corpus not found at {CORPUS} (set COMMSYNC_CORPUS_DIR)")
async def test_blocklist_and_automated_mail_on_the_corpus(dovecot, memory_store):
    plain = dovecot.new_user("plain")
    everything = dovecot.new_user("all")
    copies: dict[str, list[tuple[bool, list]]] = {}
    for path in CORPUS_FILES:
        raw = path.read_bytes()
        try:
            dovecot.append(plain.name, "INBOX", raw)
        except Exception:  # the server's own limits (bare NULs), as in test_imap_sync
            continue
        dovecot.append(everything.name, "INBOX", raw)
        record = normalize_email(raw)
        copies.setdefault(record["_id"], []).append((expected_automated(raw), record["participants"]))
    appended = sum(len(c) for c in copies.values())
    assert appended >= len(CORPUS_FILES) * 0.9, f"the server refused {len(CORPUS_FILES) - appended} corpus files"
    # Some corpus files share a Message-ID: judge only ids whose copies agree.
    automated = {rid for rid, c in copies.items() if all(auto for auto, _ in c)}
    people = {rid: c[0][1] for rid, c in copies.items() if not any(auto for auto, _ in c) and len(c) == 1}
    senders = sorted({p["address"] for parts in people.values() for p in parts if p["role"] == "from"})
    assert len(automated) >= 10 and len(senders) >= 20
    # Block one real sender by address and another by domain.
    by_address, by_domain = senders[0], senders[-1].rpartition("@")[2]
    blocked = {rid for rid, parts in people.items() if _blocked(parts, {by_address}, {by_domain})}
    assert blocked

    await sync(settings_for(dovecot, plain, blocklist=[by_address, "@" + by_domain]), memory_store)
    stored = set(await ids(memory_store))
    assert not stored & automated, sorted(stored & automated)
    assert not stored & blocked
    assert set(people) - blocked <= stored

    # With capture_automated the same automated mail is kept, flagged with its evidence.
    await memory_store.records.delete_many({})
    await sync(settings_for(dovecot, everything, capture_automated=True), memory_store)
    flagged = {d["_id"]: d["automated_by"] for d in await memory_store.records.find({"automated": True}).to_list(None)}
    assert automated <= set(flagged) and all(flagged.values())
    assert not set(flagged) & set(people)
