"""Small text helpers every command and log line shares: one home each."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from commsync.connectors.base import ERROR_CHARS, cut, describe

__all__ = ["ERROR_CHARS", "cut", "describe", "json_default"]


def json_default(value: Any) -> Any:
    """json.dumps(default=...) for records: dates as ISO 8601, anything else (ObjectId, Decimal) as text."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
