"""Quarantine: items that could not be captured, kept visible until they are or an admin lets them go.

An item lands here when its connector could not read it (a parse worker that
died on it, a Twilio item whose fields make no sense) or the server refused
its record (too large, a validator). Its batch goes on without it. Passes
retry it a few times with backoff (``next_attempt_at``); after
``MAX_ATTEMPTS`` it waits for an admin (`commsync quarantine retry|drop`).
Nothing here holds the item's content: source, stream, the item's id there,
the reason and the attempts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from pymongo import UpdateOne

from commsync.connectors.base import MalformedItem

from .. import capture
from ..text import cut
from .base import StoreBase, now_utc

MAX_ATTEMPTS = 5
# A reason is part of an entry's id when the item has none: a bound that never moves.
REASON_CHARS = 300
# The n-th automatic retry waits FIRST_RETRY * 4**(n-1): 5 minutes, 20 minutes, 80 minutes, ...
FIRST_RETRY = timedelta(minutes=5)


def quarantine_id(source: str | None, stream: str | None, item_id: Any, reason: str) -> str:
    """The entry's _id: one per item (an item without an id is one per reason)."""
    key = item_id if item_id is not None else "sha1:" + hashlib.sha1(reason.encode()).hexdigest()[:16]
    return f"{source or '?'}/{stream or '?'}/{key}"


def next_retry(attempts: int) -> timedelta | None:
    """When the next automatic retry comes after ``attempts``; None once it is the admin's turn."""
    if attempts >= MAX_ATTEMPTS:
        return None
    return FIRST_RETRY * 4 ** max(0, attempts - 1)


class QuarantineMixin(StoreBase):
    """The `quarantine` collection."""

    async def quarantine_items(self, source: str | None, stream: str | None, items: Sequence[MalformedItem]) -> int:
        """Keep ``items`` the connector could not read; how many entries were written."""
        entries = [(item.stream or stream, item.item_id, None, item.reason, item.detail) for item in items]
        return await self._quarantine(source, entries)

    async def quarantine_records(self, source: str | None, stream: str | None, refused: Sequence[tuple[dict[str, Any], str]]) -> int:
        """Keep the ids of records that could not be stored, with why."""
        # One entry per item: a record merged from two UIDs of the stream is quarantined under both.
        entries = [
            (stream, item_id, record.get("_id"), reason, detail)
            for record, reason in refused
            for item_id, detail in capture.items_of(record, source, stream)
        ]
        return await self._quarantine(source, entries)

    async def _quarantine(self, source: str | None, entries: Iterable[tuple[str | None, Any, Any, str, dict[str, Any]]]) -> int:
        now = now_utc()
        ops, ids = [], []
        for stream, item_id, record_id, reason, detail in entries:
            reason = cut(reason, REASON_CHARS)
            qid = quarantine_id(source, stream, item_id, reason)
            ids.append(qid)
            ops.append(
                UpdateOne(
                    {"_id": qid},
                    {
                        "$set": {
                            "source": source,
                            "stream": stream,
                            "item_id": item_id,
                            "detail": dict(detail or {}),
                            "record_id": record_id,
                            "reason": reason,
                            "last_attempt_at": now,
                        },
                        "$setOnInsert": {"first_attempt_at": now},
                        "$inc": {"attempts": 1},
                    },
                    upsert=True,
                )
            )
        if not ops:
            return 0
        await self.quarantined.bulk_write(ops, ordered=False)
        await self._reschedule({"_id": {"$in": ids}}, now)
        return len(ops)

    async def quarantine_attempt_failed(
        self, source: str, stream: str, item_ids: Iterable[Any], error: str, *, stream_gone: bool = False
    ) -> int:
        """Count a retry of these entries that failed before their items could be read (the whole stream failed).

        One attempt further on the same schedule as a failed read; after
        ``MAX_ATTEMPTS`` the admin's turn. ``error`` (already described, never
        content) is kept as ``last_error``; when the stream itself is gone it
        becomes the entry's reason, so that `quarantine list` says why.
        """
        ids = list(item_ids)
        if not ids:
            return 0
        now = now_utc()
        query = {"source": source, "stream": stream, "item_id": {"$in": ids}}
        fields: dict[str, Any] = {"last_attempt_at": now, "last_error": cut(error, REASON_CHARS)}
        if stream_gone:
            fields["reason"] = cut(f"stream {stream!r} is gone at the source: {error}", REASON_CHARS)
        result = await self.quarantined.update_many(query, {"$set": fields, "$inc": {"attempts": 1}})
        await self._reschedule(query, now)
        return result.modified_count

    async def _reschedule(self, query: dict[str, Any], now: Any) -> None:
        """Set the next retry of the matching entries from the attempt count the server now holds."""
        docs = await self.quarantined.find(query, {"attempts": 1, "item_id": 1}).to_list(None)
        if docs:
            await self.quarantined.bulk_write(
                [
                    # An item without an id cannot be fetched again: it waits for an admin from the start.
                    UpdateOne({"_id": d["_id"]}, {"$set": {"next_attempt_at": _due(now, d.get("attempts", 1)) if d.get("item_id") is not None else None}})
                    for d in docs
                ],
                ordered=False,
            )

    async def quarantine_list(self, source: str | None = None) -> list[dict[str, Any]]:
        """Every entry (of one source), oldest first."""
        q = {} if source is None else {"source": source}
        return await self.quarantined.find(q).sort("first_attempt_at", 1).to_list(None)

    async def quarantine_get(self, qid: str) -> dict[str, Any] | None:
        return await self.quarantined.find_one({"_id": qid})

    async def quarantine_due(self, source: str) -> list[dict[str, Any]]:
        """Entries of ``source`` whose automatic retry is due now."""
        return await self.quarantined.find({"source": source, "next_attempt_at": {"$lte": now_utc()}}).to_list(None)

    async def quarantine_due_sources(self) -> set[str]:
        """The sources with an entry whose automatic retry is due now (one query for all of them)."""
        docs = await self.quarantined.find({"next_attempt_at": {"$lte": now_utc()}}, {"source": 1}).to_list(None)
        return {d["source"] for d in docs}

    async def quarantine_retry_now(self, qid: str) -> bool:
        """Make an entry due now (a running daemon looks within a minute); False when unknown."""
        result = await self.quarantined.update_one({"_id": qid}, {"$set": {"next_attempt_at": now_utc(), "attempts": 0}})
        return result.matched_count == 1

    async def quarantine_drop(self, qid: str) -> bool:
        """Let an entry go for good (`commsync quarantine drop`); False when unknown."""
        return (await self.quarantined.delete_one({"_id": qid})).deleted_count == 1

    async def quarantine_clear(self, source: str, stream: str, item_ids: Iterable[Any]) -> int:
        """Forget entries whose items are stored now, or no longer on the remote side."""
        ids = list(item_ids)
        if not ids:
            return 0
        result = await self.quarantined.delete_many({"source": source, "stream": stream, "item_id": {"$in": ids}})
        return result.deleted_count



def _due(now: Any, attempts: int) -> Any:
    wait = next_retry(attempts)
    return now + wait if wait is not None else None
