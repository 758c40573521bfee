"""What capture keeps: automated mail, the blocklist, suppressed people, retention, auto-created customers.

Pure functions over records; the store applies them to each batch and does
the I/O (the tombstone and suppression lookups, the writes).

A participant's *key* is how commsync compares people: a lowercased email
address, or an E.164 phone number. Suppressed keys are stored only as
``sha256:`` digests (see `suppression_key`), so the suppression list does not
itself keep the addresses of the people who asked to be forgotten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from commsync.connectors.phones import to_e164

AUTO_CREATED_BY = "commsync"
# A blocked sender is never captured; a record is also dropped when every one of its
# external participants is blocked (newsletters addressed to us alone).
DROP_AUTOMATED = "automated"
DROP_BLOCKLISTED = "blocklisted"
DROP_RETENTION = "retention"


@dataclass(frozen=True, slots=True)
class CapturePolicy:
    """The capture rules of one configuration. The default keeps everything (a bare Store in tests)."""

    matched_only: bool = False
    capture_automated: bool = True
    blocked_addresses: frozenset[str] = frozenset()
    blocked_domains: frozenset[str] = frozenset()
    blocked_numbers: frozenset[str] = frozenset()
    retention: timedelta | None = None
    auto_create: str = "none"
    region: str | None = None


def from_settings(settings: Any) -> CapturePolicy:
    """The policy a configuration asks for."""
    region = getattr(settings, "default_region", None)
    addresses, domains, numbers = set(), set(), set()
    for entry in settings.blocklist:
        if entry.startswith("@"):
            domains.add(entry[1:])
        elif "@" in entry:
            addresses.add(entry)
        else:
            numbers.add(to_e164(entry, region) or entry)
    days = settings.retention.days
    return CapturePolicy(
        matched_only=settings.capture.policy == "matched",
        capture_automated=settings.capture_automated,
        blocked_addresses=frozenset(addresses),
        blocked_domains=frozenset(domains),
        blocked_numbers=frozenset(numbers),
        retention=timedelta(days=days) if days else None,
        auto_create=settings.customers.auto_create,
        region=region,
    )


# -- keys ------------------------------------------------------------------------


def key_of(address: Any, region: str | None = None) -> str | None:
    """The comparison key of one address or number: lowercased email, E.164 number, else None."""
    if not isinstance(address, str) or not address.strip():
        return None
    if "@" in address:
        return address.strip().lower()
    return to_e164(address, region)


def participant_keys(text: str, region: str | None = None) -> list[str]:
    """What ``--participant TEXT`` looks for in ``participants.address``: the key, and the text as written."""
    out = [text.strip()]
    key = key_of(text, region)
    if key and key not in out:
        out.insert(0, key)
    return out


def external_keys(record: Mapping[str, Any], region: str | None = None) -> set[str]:
    """Keys of the record's participants that are not our own."""
    return {k for p in record.get("participants", ()) if not p.get("internal") and (k := key_of(p.get("address"), region))}


def suppression_key(key: str) -> str:
    """How a suppressed address or number is stored: a digest, not the address itself."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


# -- screening ---------------------------------------------------------------------


def is_automated(record: Mapping[str, Any]) -> bool:
    """Mail a machine sent (auto-replies, bounces, lists, newsletters): see connectors/mail.py."""
    return record.get("automated") is True


def is_blocked(key: str, policy: CapturePolicy) -> bool:
    """True for a blocklisted address, an address in a blocklisted domain (or a subdomain), or number."""
    if "@" not in key:
        return key in policy.blocked_numbers
    if key in policy.blocked_addresses:
        return True
    domain = key.rpartition("@")[2]
    return any(domain == d or domain.endswith("." + d) for d in policy.blocked_domains)


def screen(record: Mapping[str, Any], policy: CapturePolicy, now: datetime) -> str | None:
    """Why the record must not be captured (a DROP_* reason), or None to keep it."""
    if not policy.capture_automated and is_automated(record):
        return DROP_AUTOMATED
    if policy.retention is not None:
        at = record.get("occurred_at")
        if isinstance(at, datetime) and at < now - policy.retention:
            return DROP_RETENTION
    if policy.blocked_addresses or policy.blocked_domains or policy.blocked_numbers:
        external = [p for p in record.get("participants", ()) if not p.get("internal")]
        keys = [key_of(p.get("address"), policy.region) for p in external]
        for p, key in zip(external, keys, strict=True):
            if p.get("role") == "from" and key and is_blocked(key, policy):
                return DROP_BLOCKLISTED
        known = [k for k in keys if k]
        if known and all(is_blocked(k, policy) for k in known):
            return DROP_BLOCKLISTED
    return None


def redact(record: dict[str, Any], suppressed: set[str], region: str | None = None) -> dict[str, Any] | None:
    """The record without its suppressed participants; None when they were all its external participants.

    ``suppressed`` holds `suppression_key` digests. A record that also involves
    someone else is kept for them, minus the suppressed people.
    """
    if not suppressed:
        return record
    kept, removed, external_left = [], 0, 0
    for p in record.get("participants", ()):
        key = key_of(p.get("address"), region)
        if not p.get("internal") and key and suppression_key(key) in suppressed:
            removed += 1
            continue
        kept.append(p)
        external_left += not p.get("internal")
    if not removed:
        return record
    if not external_left:
        return None
    return {**record, "participants": kept}


# -- auto-created customers ------------------------------------------------------------


def auto_customer_id(address: str) -> str:
    return f"{AUTO_CREATED_BY}:{address}"


def customers_to_create(
    records: Iterable[Mapping[str, Any]], by_key: Mapping[str, list[Any]], mode: str
) -> dict[str, dict[str, Any]]:
    """New customer documents, by address, for external mail participants that match no customer.

    ``mode`` "sent" looks at outbound mail only, "sent_and_received" at all mail;
    automated mail never creates customers.
    """
    if mode not in ("sent", "sent_and_received"):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("channel") != "email" or is_automated(record):
            continue
        if mode == "sent" and record.get("direction") != "outbound":
            continue
        for p in record.get("participants", ()):
            key = key_of(p.get("address"))
            if p.get("internal") or not key or "@" not in key or key in by_key or key in out:
                continue
            out[key] = {
                "_id": auto_customer_id(key),
                "name": p.get("name") or None,
                "emails": [key],
                "phones": [],
                "created_by": AUTO_CREATED_BY,
                "origin": "auto_create",
            }
    return out
