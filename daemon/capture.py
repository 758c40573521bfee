"""What one batch does to the store, decided before anything is written. Pure.

The store reads what it needs for a batch in one round trip (the records'
previous customers, tombstones, suppressed participants, matching customers),
then `plan` decides everything: which records are left out and why, who each
remaining record belongs to, which customers commsync creates, whose histories
change. The store then writes the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import matching, policy


@dataclass(slots=True)
class Screened:
    """A batch after the rules that need no lookup: one entry per _id, and what was left out."""

    records: dict[Any, dict[str, Any]]
    dropped: dict[str, int] = field(default_factory=dict)
    # Each record left out, with why: the store keeps this per item, so `verify` tells excluded from missing.
    left_out: dict[Any, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def drop(self, rid: Any, reason: str) -> None:
        record = self.records.pop(rid, None)
        if record is not None:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            self.left_out[rid] = (reason, record)


@dataclass(frozen=True, slots=True)
class Lookups:
    """What the store read for a batch."""

    previous: Mapping[Any, list[Any]]  # record id -> its customer ids, for records stored before
    tombstoned: frozenset[Any]
    suppressed: frozenset[str]  # suppression digests among the batch's participants
    by_key: Mapping[str, list[Any]]  # participant key -> customer ids (matching.index_customers)


@dataclass(slots=True)
class Plan:
    """Everything a batch writes."""

    records: dict[Any, dict[str, Any]]
    customer_ids: dict[Any, list[Any]]
    create: list[dict[str, Any]]
    touched: set[Any]
    dropped: dict[str, int]
    left_out: dict[Any, tuple[str, dict[str, Any]]]


def screen(records: Iterable[Mapping[str, Any]], capture: policy.CapturePolicy, now: datetime) -> Screened:
    """Merge duplicates of one _id and apply the capture rules that need no lookup."""
    screened = Screened(merge_duplicates(records))
    for rid, record in list(screened.records.items()):
        reason = policy.screen(record, capture, now)
        if reason:
            screened.drop(rid, reason)
    return screened


def lookup_keys(screened: Screened, region: str | None) -> tuple[list[Any], list[str], set[str]]:
    """What the store must read for a batch: record ids, suppression digests, participant addresses."""
    records = screened.records.values()
    digests = sorted({policy.suppression_key(k) for r in records for k in policy.external_keys(r, region)})
    addresses = set().union(*(matching.external_addresses(r) for r in records)) if screened.records else set()
    return list(screened.records), digests, addresses


def plan(screened: Screened, found: Lookups, capture: policy.CapturePolicy, region: str | None) -> Plan:
    """Decide the batch: tombstones and suppression, matching, customers to create, ``matched`` policy."""
    for rid in found.tombstoned:
        screened.drop(rid, "tombstoned")
    for rid, record in list(screened.records.items()):
        kept = policy.redact(record, set(found.suppressed), region)
        if kept is None:
            screened.drop(rid, "suppressed")
        else:
            screened.records[rid] = kept
    records = screened.records
    created = policy.customers_to_create(records.values(), found.by_key, capture.auto_create)
    by_key = {**found.by_key, **{key: [doc["_id"]] for key, doc in created.items()}}
    assigned = {rid: matching.assign(r, by_key) for rid, r in records.items()}
    if capture.matched_only:
        # A stored record that no longer matches is updated, not left stale.
        for rid in [rid for rid, cids in assigned.items() if not cids and rid not in found.previous]:
            screened.drop(rid, "unmatched")
            del assigned[rid]
    used = {cid for cids in assigned.values() for cid in cids}
    touched = used | {cid for rid in records for cid in found.previous.get(rid, ())}
    return Plan(
        records=records,
        customer_ids=assigned,
        create=[doc for doc in created.values() if doc["_id"] in used],
        touched=touched,
        dropped=screened.dropped,
        left_out=screened.left_out,
    )


def merge_duplicates(records: Iterable[Mapping[str, Any]]) -> dict[Any, dict[str, Any]]:
    """One entry per _id: a batch may hold the same message twice (two folders, a duplicate)."""
    merged: dict[Any, dict[str, Any]] = {}
    for record in records:
        rid = record["_id"]
        if rid in merged:
            sources = merged[rid].setdefault("sources", [])
            sources.extend(s for s in record.get("sources", ()) if s not in sources)
        else:
            merged[rid] = {**record, "sources": list(record.get("sources", ()))}
    return merged


def items_of(record: Mapping[str, Any], source: str | None, stream: str | None) -> list[tuple[Any, dict[str, Any]]]:
    """Every item of ``source``/``stream`` a record came from: (its id there, what else locates it).

    An IMAP message is its UID under a UIDVALIDITY; anything else is the
    record's own id (a Twilio SID).

    A batch may hold one message under two UIDs of a folder (a copy); they
    become one record (`merge_duplicates`), and what is noted about it (left
    out, quarantined) holds for each of them.
    """
    return [(e["uid"], {"uidvalidity": e.get("uidvalidity")}) for e in _entries(record, source, stream)] or [(record.get("_id"), {})]


def _entries(record: Mapping[str, Any], source: str | None, stream: str | None) -> list[Mapping[str, Any]]:
    return [
        e
        for e in record.get("sources", ())
        if e.get("source") == source and e.get("uid") is not None and e.get("folder", stream) == stream
    ]
