"""Record filters (the `records list|export|delete` options) as one MongoDB query and sort. Pure.

Which index answers what (see Store.ensure_indexes):

- ``--customer``: ``customer_time`` (customer_ids, occurred_at desc), so a
  customer's timeline is an index scan in the order asked for, whatever its size;
- ``--channel``: ``channel_time``; ``--participant``: ``participant_time``;
- anything else, and ``--since``/``--until`` alone: ``time`` (occurred_at desc).

``--text`` is a case-insensitive match of every word in subject or content.
It is not a MongoDB text index on purpose: ``$text`` does not exist on the
mongomock double the tests run on, and a regular expression means the same on
both. It cannot use an index, so it filters the records the other options
select, newest first, and stops at ``--limit``: with no other option and few
matches it reads the collection.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

SORT: list[tuple[str, int]] = [("occurred_at", -1)]
# A duration needs its unit: a bare "2025" is a year, not 2025 seconds.
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*(m|h|d|w)$")
_UNIT = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class Filters:
    """What to select. ``customer`` holds the id's variants (see store.id_variants)."""

    customer: Sequence[Any] = ()
    channel: str | None = None
    direction: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    participant: Sequence[str] = ()
    text: str | None = None

    def is_empty(self) -> bool:
        return not (self.customer or self.channel or self.direction or self.since or self.until or self.participant or self.text)


def query(f: Filters) -> dict[str, Any]:
    """The MongoDB filter of ``f``."""
    q: dict[str, Any] = {}
    if f.customer:
        q["customer_ids"] = f.customer[0] if len(f.customer) == 1 else {"$in": list(f.customer)}
    if f.channel:
        q["channel"] = f.channel
    if f.direction:
        q["direction"] = f.direction
    when: dict[str, Any] = {}
    if f.since is not None:
        when["$gte"] = f.since
    if f.until is not None:
        when["$lt"] = f.until
    if when:
        q["occurred_at"] = when
    if f.participant:
        q["participants.address"] = f.participant[0] if len(f.participant) == 1 else {"$in": list(f.participant)}
    if f.text:
        words = f.text.split()
        if words:
            q["$and"] = [text_clause(w) for w in words]
    return q


def text_clause(word: str) -> dict[str, Any]:
    """Records whose subject or content contains ``word``, ignoring case."""
    pattern = re.compile(re.escape(word), re.IGNORECASE)
    return {"$or": [{"subject": pattern}, {"content": pattern}]}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``2025-03-01``, ``2025-03-01T09:30``, ``2025-03-01T09:30:00+02:00`` or a duration ago (``90m``, ``12h``, ``30d``, ``2w``).

    Dates and times without an offset are UTC.
    """
    text = text.strip()
    ago = _AGO.match(text)
    if ago:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(ago.group(1)) * _UNIT[ago.group(2)])
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a date (2025-03-01), a time (2025-03-01T09:30) or a duration (30d)") from None
        value = datetime(day.year, day.month, day.day)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
