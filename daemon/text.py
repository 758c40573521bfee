"""Small text helpers every command and log line shares: one home each."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from commsync.connectors.base import ERROR_CHARS, cut, describe

__all__ = ["ERROR_CHARS", "cut", "describe", "field_key", "field_name", "json_default"]


def json_default(value: Any) -> Any:
    """json.dumps(default=...) for records: dates as ISO 8601, anything else (ObjectId, Decimal) as text."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def field_key(name: str) -> str:
    """``name`` (a folder: it may hold dots and dollars) as a MongoDB field name; `field_name` undoes it."""
    return name.replace("%", "%25").replace(".", "%2E").replace("$", "%24")


def field_name(key: str) -> str:
    """The name a `field_key` stands for."""
    return key.replace("%24", "$").replace("%2E", ".").replace("%25", "%")
