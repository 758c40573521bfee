"""A small store to run the admin operations on: customers, emails, a call and a text."""

from __future__ import annotations

import email
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from records import T0, email_record, hours

ALICE, BOB, STRANGER = "alice@example.com", "bob@example.org", "stranger@nowhere.example"
BOB_PHONE = "+14155550100"

CUSTOMERS = [
    {"_id": "c-alice", "name": "Alice Example", "emails": ["Alice@Example.com"], "phones": []},
    {"_id": "c-bob", "name": "Bob Sample", "emails": [BOB], "phones": ["+1 415-555-0100"]},
    {"_id": "c-carol", "name": "Carol Nobody", "emails": ["carol@example.net"], "phones": []},
]

# Material shared beside the checkout (CI clones the repository next to shared/), never copied in.
SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = Path(os.environ.get("COMMSYNC_CORPUS_DIR") or SHARED / "corpus" / "email")
CORPUS_FILES = sorted(CORPUS.glob("*.eml")) if CORPUS.is_dir() else []
TWILIO_SPEC = SHARED / "twilio" / "twilio_api_v2010.json"


def with_cc(record: dict[str, Any], address: str) -> dict[str, Any]:
    record["participants"].append({"role": "cc", "address": address, "name": None, "internal": False})
    return record


def phone_record(rid: str, channel: str, at: datetime, *, direction: str = "inbound", content: str = "") -> dict[str, Any]:
    """A call or text shaped like the Twilio connector's records."""
    ours = {"role": "to" if direction == "inbound" else "from", "address": "+14155559999", "name": None, "internal": True}
    theirs = {"role": "from" if direction == "inbound" else "to", "address": BOB_PHONE, "name": None, "internal": False}
    record = {
        "_id": rid,
        "channel": channel,
        "direction": direction,
        "occurred_at": at,
        "participants": [theirs, ours] if direction == "inbound" else [ours, theirs],
        "subject": None,
        "content": content,
        "content_truncated": False,
        "thread_id": BOB_PHONE,
        "attachments": [],
        "sources": [{"kind": "twilio", "source": "support", "account_sid": "AC123", "list": "calls" if channel == "call" else "messages"}],
    }
    if channel == "call":
        record["call"] = {"status": "completed", "duration_s": 252, "price": None, "recordings": []}
    return record


def seed_records() -> list[dict[str, Any]]:
    e1 = email_record("e1@x", ALICE, at=T0, uid=1)
    e1["subject"] = "Pallet quote"
    e2 = email_record("e2@x", ALICE, at=T0 + hours(1), direction="outbound", folder="Sent", uid=1)
    e2["subject"] = "Re: Pallet quote"
    e3 = email_record("e3@x", BOB, at=T0 + hours(2), uid=2)
    e3["subject"], e3["content"] = "Invoice 42", "Please find the invoice for the pallets attached."
    e4 = with_cc(email_record("e4@x", ALICE, at=T0 + hours(3), uid=3), BOB)
    e4["subject"] = "Meeting on Friday"
    e5 = email_record("e5@x", STRANGER, at=T0 + hours(4), uid=4)
    e5["subject"] = "Cold offer"
    call = phone_record("CA0001", "call", T0 + hours(5), content="Inbound call, 4 min 12 s, completed")
    sms = phone_record("SM0001", "sms", T0 + hours(6), content="Delivery tomorrow at 9")
    return [e1, e2, e3, e4, e5, call, sms]


async def seed(store) -> None:
    await store.customers.insert_many([dict(c) for c in CUSTOMERS])
    await store.write_batch(seed_records())


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "updated_at"}


async def assert_histories_are_rebuild(store) -> None:
    stored = {d["_id"]: strip(d) for d in await store.history.find().to_list(None)}
    rebuilt = {k: strip(v) for k, v in (await store.rebuild_history()).items()}
    assert stored == rebuilt


def expected_automated(raw: bytes) -> bool:
    """What the top-level headers say, read independently of the normalizer."""
    msg = email.message_from_bytes(raw)
    auto = str(msg.get("Auto-Submitted") or "").split(";")[0].strip().lower()
    precedence = str(msg.get("Precedence") or "").strip().lower()
    return bool(
        (auto and auto != "no")
        or str(msg.get("List-Id") or "").strip()
        or precedence in ("bulk", "list", "junk", "auto_reply")
        or str(msg.get("List-Unsubscribe") or "").strip()
    )
