"""Record factories for tests that need records without parsing mail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def email_record(
    rid: str,
    external: str = "alice@example.com",
    *,
    at: datetime | None = None,
    direction: str = "inbound",
    source: str = "sales",
    folder: str = "INBOX",
    uid: int = 1,
    uidvalidity: int = 1,
    internal: str = "sales@ourco.example",
) -> dict[str, Any]:
    """A normalized email record from ``external`` to our mailbox (or back when outbound)."""
    ext = {"role": "from" if direction == "inbound" else "to", "address": external, "name": None, "internal": False}
    own = {"role": "to" if direction == "inbound" else "from", "address": internal, "name": None, "internal": True}
    return {
        "_id": rid,
        "channel": "email",
        "direction": direction,
        "occurred_at": at or T0,
        "participants": [ext, own] if direction == "inbound" else [own, ext],
        "subject": f"subject {rid}",
        "content": f"content {rid}",
        "content_truncated": False,
        "message_id": rid,
        "thread_id": rid,
        "attachments": [],
        "sources": [{"kind": "imap", "source": source, "folder": folder, "uidvalidity": uidvalidity, "uid": uid}],
    }


def hours(n: float) -> timedelta:
    return timedelta(hours=n)
