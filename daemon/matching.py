"""Customer matching: which customers a record involves. Pure functions; the store does the I/O.

A record's external participants are email addresses or phone numbers in
E.164 (connectors normalize them). Customers hold ``emails`` and ``phones``
as the CRM wrote them.

Phones: the lookup asks for every common rendering of each E.164 number
(``phones.variants``: "+1 415-555-0100", "(415) 555-0100", "4155550100",
"001 415 555 0100", ...) with an exact ``$in``, which an index on
``phones`` serves, then confirms each hit by normalizing the stored number
to E.164 with ``default_region``. Accepted limitation: a stored format
outside that list (odd grouping such as "41 55 55 01 00", an extension,
text around the number, leading blanks) is not found; store E.164 in the
CRM to be safe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from commsync.connectors.phones import is_e164, to_e164, variants


def external_addresses(record: Mapping[str, Any]) -> set[str]:
    """Email addresses and E.164 numbers of the record's participants that are not our own."""
    out = set()
    for p in record.get("participants", ()):
        address = p.get("address") or ""
        if not p.get("internal") and ("@" in address or is_e164(address)):
            out.add(address)
    return out


def customer_filter(addresses: Iterable[str], default_region: str | None = None) -> dict[str, Any]:
    """One query for a whole batch: customers holding any of ``addresses`` (emails and E.164 numbers).

    Emails match case-insensitively: anchored, escaped, case-insensitive
    patterns behave the same on MongoDB and on the mongomock test double (a
    collation does not), and CRM data is rarely lowercased. Numbers match any
    of their common renderings (see the module docstring).
    """
    emails = sorted(a for a in addresses if "@" in a)
    numbers = sorted(a for a in addresses if is_e164(a))
    clauses: list[dict[str, Any]] = []
    if emails:
        patterns = [re.compile("^" + re.escape(a) + "$", re.IGNORECASE) for a in emails]
        clauses.append({"emails": {"$in": patterns}})
    if numbers:
        clauses.append({"phones": {"$in": phone_lookup(numbers, default_region)}})
    if len(clauses) == 1:
        return clauses[0]
    return {"$or": clauses} if clauses else {"_id": {"$in": []}}


def phone_lookup(numbers: Iterable[str], default_region: str | None = None) -> list[Any]:
    """Every rendering of ``numbers`` a CRM may hold, plus digit-only ones stored as integers."""
    out: set[Any] = set()
    for number in numbers:
        for text in variants(number, default_region):
            out.add(text)
            # Spreadsheet imports often store numbers as numbers.
            if text.isdigit() and not text.startswith("0"):
                out.add(int(text))
    return sorted(out, key=lambda v: (isinstance(v, int), str(v)))


def index_customers(customers: Iterable[Mapping[str, Any]], default_region: str | None = None) -> dict[str, list[Any]]:
    """Map each lowercased email and each E.164 phone number to the ids of the customers that hold it."""
    by_key: dict[str, list[Any]] = {}

    def add(key: str, cid: Any) -> None:
        ids = by_key.setdefault(key, [])
        if cid not in ids:
            ids.append(cid)

    for customer in customers:
        for address in _as_list(customer.get("emails")):
            if isinstance(address, str):
                add(address.strip().lower(), customer["_id"])
        for phone in _as_list(customer.get("phones")):
            number = to_e164(phone, default_region)
            if number is not None:
                add(number, customer["_id"])
    return by_key


def _as_list(value: Any) -> list[Any]:
    """A CRM field that should be a list may hold one bare value."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def assign(record: Mapping[str, Any], by_key: Mapping[str, list[Any]]) -> list[Any]:
    """The sorted ids of every customer the record involves."""
    ids = {cid for key in external_addresses(record) for cid in by_key.get(key, ())}
    return sorted(ids, key=str)
