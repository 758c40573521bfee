"""Per-customer history: an aggregation over the records, folded into one document per customer.

History is a pure function of the records, so recomputing it for the
customers a batch touched gives exactly what a rebuild from scratch would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from .schema import SCHEMA_VERSION


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
        {"$project": {"customer_ids": 1, "channel": 1, "direction": 1, "occurred_at": 1, "call.duration_s": 1}},
        {"$unwind": "$customer_ids"},
        # A record may involve other customers too; keep only the ones asked for.
        *only,
        # $last below then means "latest", with the _id breaking ties the same way every time.
        {"$sort": {"occurred_at": 1, "_id": 1}},
        {
            "$group": {
                "_id": {"customer": "$customer_ids", "channel": "$channel"},
                "count": {"$sum": 1},
                "first_at": {"$min": "$occurred_at"},
                "last_at": {"$max": "$occurred_at"},
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
    return {cid: _document(cid, groups, now) for cid, groups in by_customer.items()}


def _document(customer_id: Any, groups: list[Mapping[str, Any]], now: datetime) -> dict[str, Any]:
    # Latest channel: the one whose last contact is newest; the name breaks ties deterministically.
    latest = max(groups, key=lambda g: (g["last_at"], g["_id"]["channel"]))
    channels: dict[str, dict[str, Any]] = {}
    for g in sorted(groups, key=lambda g: g["_id"]["channel"]):
        entry: dict[str, Any] = {"count": g["count"], "first_at": g["first_at"], "last_at": g["last_at"]}
        if g["_id"]["channel"] == "call":
            entry["talk_seconds"] = int(g["talk_seconds"])
        channels[g["_id"]["channel"]] = entry
    return {
        "_id": customer_id,
        "total": sum(g["count"] for g in groups),
        "first_at": min(g["first_at"] for g in groups),
        "last_at": latest["last_at"],
        "last_channel": latest["_id"]["channel"],
        "last_direction": latest["last_direction"],
        "inbound": sum(g["inbound"] for g in groups),
        "outbound": sum(g["outbound"] for g in groups),
        "channels": channels,
        "updated_at": now,
        "schema_version": SCHEMA_VERSION,
    }
