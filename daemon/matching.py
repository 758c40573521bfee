"""Customer matching: which customers a record involves. Pure functions; the store does the I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def external_addresses(record: Mapping[str, Any]) -> set[str]:
    """Email addresses of the record's participants that are not our own."""
    return {
        p["address"]
        for p in record.get("participants", ())
        if not p.get("internal") and "@" in (p.get("address") or "")
    }


def customer_filter(addresses: Iterable[str]) -> dict[str, Any]:
    """One query for a whole batch: customers holding any of ``addresses``, case-insensitively.

    Anchored, escaped, case-insensitive patterns behave the same on MongoDB and
    on the mongomock test double (a collation does not), and CRM data is
    rarely lowercased.
    """
    patterns = [re.compile("^" + re.escape(a) + "$", re.IGNORECASE) for a in sorted(addresses)]
    return {"emails": {"$in": patterns}}


def index_customers(customers: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Map each lowercased address to the ids of the customers that hold it."""
    by_key: dict[str, list[Any]] = {}
    for customer in customers:
        for address in customer.get("emails") or ():
            if isinstance(address, str):
                ids = by_key.setdefault(address.strip().lower(), [])
                if customer["_id"] not in ids:
                    ids.append(customer["_id"])
    return by_key


def assign(record: Mapping[str, Any], by_key: Mapping[str, list[Any]]) -> list[Any]:
    """The sorted ids of every customer the record involves."""
    ids = {cid for key in external_addresses(record) for cid in by_key.get(key, ())}
    return sorted(ids, key=str)
