"""What the admin commands ask of the database: selections, chunks, customers, cleanup.

The orchestration (chunks, reports, which histories to recompute) lives in
daemon/admin.py; every read and write it makes goes through these methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from .histories import HistoryMixin
from .refusals import sanitized


class AdminMixin(HistoryMixin):
    """Reads and writes of `records`, `customers`, `customer_history` and `tombstones` for admin operations."""

    async def count_selection(self, q: Mapping[str, Any]) -> tuple[int, int]:
        """How many records ``q`` selects, and how many distinct customers they involve."""
        records = await self.records.count_documents(dict(q))
        rows = await self.records.aggregate(
            [{"$match": dict(q)}, {"$project": {"customer_ids": 1}}, {"$unwind": "$customer_ids"}, {"$group": {"_id": "$customer_ids"}}, {"$count": "n"}]
        ).to_list(None)
        return records, rows[0]["n"] if rows else 0

    async def records_page(self, q: Mapping[str, Any], fields: Mapping[str, int], limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` records of ``q`` (only ``fields``), in no particular order."""
        return await self.records.find(dict(q), dict(fields)).limit(limit).to_list(None)

    async def records_after(self, q: Mapping[str, Any], fields: Mapping[str, int], limit: int, after_id: Any) -> list[dict[str, Any]]:
        """Up to ``limit`` records of ``q`` in _id order, past ``after_id`` (None: from the start).

        Paging by _id stays right while the pages' records change the very fields ``q`` selects on.
        """
        page = dict(q) if after_id is None else {"$and": [dict(q), {"_id": {"$gt": after_id}}]}
        return await self.records.find(page, dict(fields)).sort("_id", 1).limit(limit).to_list(None)

    async def record(self, ids: Sequence[Any]) -> dict[str, Any] | None:
        """The first record whose _id is one of ``ids`` (the variants of one id)."""
        return await self.records.find_one({"_id": {"$in": list(ids)}})

    def cursor(self, q: Mapping[str, Any], *, sort: Sequence[tuple[str, int]], limit: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The records ``q`` selects, in ``sort`` order, streamed from the server in batches."""
        found = self.records.find(dict(q)).sort(list(sort))
        if limit:
            found = found.limit(limit)
        return found.batch_size(500).__aiter__()

    @sanitized
    async def delete_records(self, ids: Sequence[Any]) -> int:
        """Delete records without tombstones (retention: capture refuses them anyway); how many went."""
        query = {"_id": {"$in": list(ids)}}
        # With transactions, histories change with the records (`change_records`).
        return (await self.change_records(ids, lambda session: self.records.delete_many(query, session=session), deletes=True)).deleted_count

    @sanitized
    async def drop_tombstones_before(self, cutoff: datetime) -> int:
        return (await self.tombstones.delete_many({"occurred_at": {"$lt": cutoff}})).deleted_count

    @sanitized
    async def pull_from_records(self, ids: Sequence[Any], pull: Mapping[str, Any]) -> int:
        """``$pull`` ``pull`` from the records ``ids``; how many changed."""
        if not ids:
            return 0
        query, update = {"_id": {"$in": list(ids)}}, {"$pull": dict(pull)}
        return (await self.change_records(ids, lambda session: self.records.update_many(query, update, session=session))).modified_count

    async def find_customer(self, ids: Sequence[Any]) -> dict[str, Any] | None:
        """The customer document whose _id is one of ``ids``."""
        return await self.customers.find_one({"_id": {"$in": list(ids)}})

    def all_customers(self) -> AsyncIterator[dict[str, Any]]:
        """Every customer's emails and phones, one cursor."""
        return self.customers.find({}, {"emails": 1, "phones": 1}).__aiter__()

    @sanitized
    async def delete_customer(self, cid: Any) -> bool:
        return (await self.customers.delete_one({"_id": cid})).deleted_count == 1

    async def history_of(self, ids: Sequence[Any]) -> dict[str, Any] | None:
        """The history document of the customer whose _id is one of ``ids``."""
        return await self.history.find_one({"_id": {"$in": list(ids)}})

    @sanitized
    async def delete_histories(self, ids: Sequence[Any]) -> int:
        return (await self.history.delete_many({"_id": {"$in": list(ids)}})).deleted_count
