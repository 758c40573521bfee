"""Time as commsync stores it: UTC, aware, at MongoDB's millisecond precision.

No driver import here: the runner and the commands use it without the store.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = ["aware", "now_utc"]


def now_utc() -> datetime:
    """Now, at the millisecond precision MongoDB stores (so it compares equal to itself read back)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def aware(value: Any) -> datetime | None:
    """``value`` as an aware UTC datetime (naive is taken as UTC); None if it is not a datetime."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
