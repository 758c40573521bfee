"""Per-customer history: a pure function of the records, folded into one document per customer.

Two ways lead to the same document:

- from scratch: `pipeline` groups the records by customer and channel and
  `documents` folds the groups (`commsync rebuild-history`, and the store's
  recomputation when the server has no transactions);
- by deltas: `changes` turns the stored state of some records before and after
  a write into what each customer lost and gained, and `apply` folds that into
  the customer's stored document. Counts, directions and talk seconds are
  sums; the first and latest contact of a channel are kept with their record
  ids, so they stay exact unless a removal takes away that very record. Then,
  and whenever a document cannot be trusted to add up, `apply` answers
  `RECOMPUTE` and the store aggregates that customer from its records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from .schema import SCHEMA_VERSION

# What a record contributes to histories: the only fields `pipeline` and `changes` read.
FIELDS: Final = {"customer_ids": 1, "channel": 1, "direction": 1, "occurred_at": 1, "call.duration_s": 1}
# Bookkeeping that says when and how a document was written, not what the records are.
BOOKKEEPING: Final = frozenset({"updated_at", "revision"})


def pipeline(customer_ids: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Group the records of ``customer_ids`` (all customers when None) by customer and channel.

    Only stages MongoDB and mongomock treat alike ($match, $unwind, $sort,
    $group); the fold into one document per customer happens in `documents`.
    """
    only: list[dict[str, Any]] = []
    if customer_ids is not None:
        only = [{"$match": {"customer_ids": {"$in": list(customer_ids)}}}]
    return [
        *only,
        {"$project": FIELDS},
        {"$unwind": "$customer_ids"},
        # A record may involve other customers too; keep only the ones asked for.
        *only,
        # $first/$last below then mean "earliest"/"latest", the _id breaking ties the same way every time.
        {"$sort": {"occurred_at": 1, "_id": 1}},
        {
            "$group": {
                "_id": {"customer": "$customer_ids", "channel": "$channel"},
                "count": {"$sum": 1},
                "first_at": {"$min": "$occurred_at"},
                "last_at": {"$max": "$occurred_at"},
                "first_id": {"$first": "$_id"},
                "last_id": {"$last": "$_id"},
                "last_direction": {"$last": "$direction"},
                "inbound": {"$sum": {"$cond": [{"$eq": ["$direction", "inbound"]}, 1, 0]}},
                "outbound": {"$sum": {"$cond": [{"$eq": ["$direction", "outbound"]}, 1, 0]}},
                "talk_seconds": {"$sum": {"$ifNull": ["$call.duration_s", 0]}},
            }
        },
    ]


def documents(rows: Iterable[Mapping[str, Any]], *, now: datetime) -> dict[Any, dict[str, Any]]:
    """Fold (customer, channel) groups into one history document per customer."""
    by_customer: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_customer.setdefault(row["_id"]["customer"], []).append(row)
    out = {}
    for cid, groups in by_customer.items():
        channels = {}
        for g in groups:
            name = g["_id"]["channel"]
            entry = {k: g[k] for k in ("count", "first_at", "last_at", "first_id", "last_id", "last_direction")}
            if name == "call":
                entry["talk_seconds"] = int(g["talk_seconds"])
            channels[name] = entry
        inbound, outbound = sum(g["inbound"] for g in groups), sum(g["outbound"] for g in groups)
        out[cid] = _fold(cid, channels, inbound, outbound, now)
    return out


def _fold(customer_id: Any, channels: Mapping[str, Mapping[str, Any]], inbound: int, outbound: int, now: datetime) -> dict[str, Any]:
    # Latest channel: the one whose last contact is newest; the name breaks ties deterministically.
    latest = max(channels, key=lambda name: (channels[name]["last_at"], name))
    return {
        "_id": customer_id,
        "total": sum(e["count"] for e in channels.values()),
        "first_at": min(e["first_at"] for e in channels.values()),
        "last_at": channels[latest]["last_at"],
        "last_channel": latest,
        "last_direction": channels[latest]["last_direction"],
        "inbound": inbound,
        "outbound": outbound,
        "channels": {name: dict(channels[name]) for name in sorted(channels)},
        "updated_at": now,
        "schema_version": SCHEMA_VERSION,
    }


# -- deltas -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contact:
    """What one record adds to each of its customers' histories."""

    id: Any
    channel: Any
    direction: Any
    at: Any
    # Seconds the record adds to `channels.call.talk_seconds`; None when that is no exact integer.
    talk: int | None

    @property
    def exact(self) -> bool:
        """Whether sums and (time, id) order in Python agree with what `pipeline` computes."""
        return isinstance(self.id, str) and isinstance(self.channel, str) and isinstance(self.at, datetime) and self.talk is not None

    @property
    def key(self) -> tuple[Any, Any]:
        return (self.at, self.id)


def contact(record: Mapping[str, Any]) -> Contact:
    """The contribution of ``record`` (its `FIELDS`, as the server stores them)."""
    return Contact(record["_id"], record.get("channel"), record.get("direction"), record.get("occurred_at"), _talk(record))


def _talk(record: Mapping[str, Any]) -> int | None:
    if record.get("channel") != "call":
        return 0  # summed, but only the call channel shows it
    call = record.get("call")
    if call is None:
        return 0
    if not isinstance(call, Mapping):
        return None
    value = call.get("duration_s")
    # $sum skips what is not a number (booleans and strings included) and $ifNull makes null 0.
    if value is None or isinstance(value, bool | str):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None  # a fraction or a decimal: sums in another order could round differently


@dataclass(slots=True)
class Change:
    """What one customer's history loses and gains."""

    removed: list[Contact] = field(default_factory=list)
    added: list[Contact] = field(default_factory=list)


def changes(before: Mapping[Any, Mapping[str, Any]], after: Mapping[Any, Mapping[str, Any]]) -> dict[Any, Change]:
    """Per customer, the contributions that went and came when records went from ``before`` to ``after``.

    Both map record ids to the records' `FIELDS` (a record missing from one
    side did not exist there). A record that still contributes the same to a
    customer changes nothing for it: re-reading a batch is no change at all.
    """
    out: dict[Any, Change] = {}
    for rid in [*before, *(r for r in after if r not in before)]:
        old, new = before.get(rid), after.get(rid)
        old_c, new_c = (contact(old) if old else None), (contact(new) if new else None)
        old_n, new_n = _customers(old), _customers(new)
        for cid in [*old_n, *(c for c in new_n if c not in old_n)]:
            if old_c == new_c:
                removed, added = max(0, old_n[cid] - new_n[cid]), max(0, new_n[cid] - old_n[cid])
            else:
                removed, added = old_n[cid], new_n[cid]
            if removed or added:
                change = out.setdefault(cid, Change())
                change.removed += [old_c] * removed  # type: ignore[list-item]
                change.added += [new_c] * added  # type: ignore[list-item]
    return out


def _customers(record: Mapping[str, Any] | None) -> Counter[Any]:
    # As many times as $unwind counts them: a customer listed twice counts the record twice.
    ids = (record or {}).get("customer_ids") or []
    return Counter(ids if isinstance(ids, list) else [ids])


class _Recompute:
    def __repr__(self) -> str:
        return "RECOMPUTE"


# `apply` cannot tell the new document from the old one and the change: aggregate the customer's records.
RECOMPUTE: Final = _Recompute()


def apply(doc: Mapping[str, Any] | None, change: Change, *, customer: Any, now: datetime) -> dict[str, Any] | None | _Recompute:
    """The history of ``customer`` after ``change``: a document, None (no records left) or `RECOMPUTE`.

    ``doc`` is the stored document (None: there is none). Additions go first,
    so a record that moves later within a channel keeps the boundary where it
    is; a removal of the earliest or latest record of a channel, and anything
    that does not add up (a removal from a document without that record, a
    document written before the channel entries carried record ids), is
    `RECOMPUTE`.
    """
    if not all(c.exact for c in (*change.removed, *change.added)):
        return RECOMPUTE
    if doc is None:
        if change.removed:
            return RECOMPUTE
        channels: dict[str, dict[str, Any]] = {}
        inbound = outbound = 0
    else:
        try:
            channels = {name: _entry(name, e) for name, e in doc["channels"].items()}
            inbound, outbound = _count(doc["inbound"]), _count(doc["outbound"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return RECOMPUTE
    try:
        for c in change.added:
            _add(channels, c)
            inbound += c.direction == "inbound"
            outbound += c.direction == "outbound"
        for c in change.removed:
            if not _remove(channels, c):
                return RECOMPUTE
            inbound -= c.direction == "inbound"
            outbound -= c.direction == "outbound"
    except TypeError:  # times that do not compare (one without a time zone): let the server order them
        return RECOMPUTE
    if inbound < 0 or outbound < 0:
        return RECOMPUTE
    if not channels:
        return None
    return _fold(customer, channels, inbound, outbound, now)


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


def _entry(name: Any, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored channel entry, checked to hold what `_add` and `_remove` compare (else ValueError)."""
    entry = dict(stored)
    if not isinstance(name, str) or _count(entry["count"]) < 1:
        raise ValueError(name)
    for at, rid in (("first_at", "first_id"), ("last_at", "last_id")):
        if not isinstance(entry[at], datetime) or not isinstance(entry[rid], str):
            raise ValueError(at)
    if (entry["first_at"], entry["first_id"]) > (entry["last_at"], entry["last_id"]):
        raise ValueError("first after last")
    if "last_direction" not in entry:
        raise KeyError("last_direction")
    if name == "call" and not isinstance(entry.get("talk_seconds"), int):
        raise ValueError("talk_seconds")
    return entry


def _add(channels: dict[str, dict[str, Any]], c: Contact) -> None:
    entry = channels.get(c.channel)
    if entry is None:
        entry = channels[c.channel] = {"count": 0, "first_at": c.at, "last_at": c.at, "first_id": c.id, "last_id": c.id, "last_direction": c.direction}
        if c.channel == "call":
            entry["talk_seconds"] = 0
    entry["count"] += 1
    if c.channel == "call":
        entry["talk_seconds"] += c.talk
    if c.key < (entry["first_at"], entry["first_id"]):
        entry["first_at"], entry["first_id"] = c.key
    if c.key > (entry["last_at"], entry["last_id"]):
        entry["last_at"], entry["last_id"] = c.key
        entry["last_direction"] = c.direction


def _remove(channels: dict[str, dict[str, Any]], c: Contact) -> bool:
    """Take ``c`` out of its channel entry; False when only a recomputation knows the result."""
    entry = channels.get(c.channel)
    # At or beyond a boundary: the boundary record itself (what comes next is unknown), or one the entry cannot hold.
    if entry is None or entry["count"] < 2 or not (entry["first_at"], entry["first_id"]) < c.key < (entry["last_at"], entry["last_id"]):
        return False
    entry["count"] -= 1
    if c.channel == "call":
        entry["talk_seconds"] -= c.talk
        if entry["talk_seconds"] < 0:
            return False
    return True


# -- comparing ------------------------------------------------------------------------------


def comparable(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` without its `BOOKKEEPING`: what must equal a rebuild."""
    return {k: v for k, v in doc.items() if k not in BOOKKEEPING}


def differences(stored: Mapping[Any, Mapping[str, Any]], rebuilt: Mapping[Any, Mapping[str, Any]]) -> dict[Any, list[str]]:
    """Per customer whose stored history is not what its records give, what differs (bookkeeping aside)."""
    out: dict[Any, list[str]] = {}
    for cid in [*stored, *(c for c in rebuilt if c not in stored)]:
        if cid not in rebuilt:
            out[cid] = ["stored, but no record involves this customer"]
        elif cid not in stored:
            out[cid] = [f"missing: the records give total {rebuilt[cid].get('total')}"]
        else:
            have, want = _flat(comparable(stored[cid])), _flat(comparable(rebuilt[cid]))
            lines = [
                f"{k}: stored {have.get(k, '-')!s}, records give {want.get(k, '-')!s}"
                for k in sorted(have.keys() | want.keys())
                if have.get(k, _NONE) != want.get(k, _NONE)
            ]
            if lines:
                out[cid] = lines
    return out


_NONE = object()


def _flat(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
