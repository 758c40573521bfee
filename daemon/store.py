"""The MongoDB store: records, customer histories and checkpoints.

The only module that imports the driver. Every batch costs a fixed number of
round trips, whatever its size: one read of the records' previous customers,
one customer lookup, one bulk upsert of records, one history aggregation and
one bulk write of histories (plus one $pull when a folder was reset).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pymongo
from pymongo import DeleteOne, ReplaceOne, UpdateOne

from . import history, matching

RECORDS = "records"
HISTORY = "customer_history"
SYNC_STATE = "sync_state"

# Fields a re-read must not overwrite: identity, provenance, first sighting.
_KEEP = frozenset({"_id", "sources", "ingested_at", "customer_ids"})


@dataclass(frozen=True, slots=True)
class BatchResult:
    records: int
    inserted: int
    customers: int
    round_trips: int


def now_utc() -> datetime:
    """Now, at the millisecond precision MongoDB stores."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Store:
    """Records, histories and checkpoints in one MongoDB database."""

    def __init__(self, client: Any, database: str, *, customers: str = "customers", memory: bool = False):
        self.client = client
        self.db = client[database]
        self.records = self.db[RECORDS]
        self.history = self.db[HISTORY]
        self.sync_state = self.db[SYNC_STATE]
        self.customers = self.db[customers]
        self.memory = memory
        # Round trips to the server since start; tests and benchmarks read it.
        self.round_trips = 0

    @classmethod
    def connect(cls, uri: str, database: str, *, customers: str = "customers", timeout_ms: int = 10_000) -> Store:
        """A store on ``uri``; ``memory://`` gives a process-local mongomock store."""
        if uri.startswith("memory://"):
            from mongomock_motor import AsyncMongoMockClient

            patch_mongomock()
            return cls(AsyncMongoMockClient(tz_aware=True), database, customers=customers, memory=True)
        from motor.motor_asyncio import AsyncIOMotorClient

        client = AsyncIOMotorClient(uri, tz_aware=True, serverSelectionTimeoutMS=timeout_ms, appname="commsync")
        return cls(client, database, customers=customers)

    def close(self) -> None:
        self.client.close()

    async def ping(self) -> None:
        """Raise unless the server answers."""
        self.round_trips += 1
        await self.db.command("ping")

    async def ensure_indexes(self) -> None:
        """Indexes the daemon and integrators' timeline queries need."""
        await self.records.create_index([("customer_ids", 1), ("occurred_at", -1)], name="customer_time")
        await self.records.create_index([("channel", 1), ("occurred_at", -1)], name="channel_time")
        await self.records.create_index([("thread_id", 1)], name="thread")
        await self.sync_state.create_index([("source", 1)], name="source")
        self.round_trips += 4

    # -- checkpoints ---------------------------------------------------------

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]:
        """Every saved checkpoint of ``source``, by stream."""
        self.round_trips += 1
        docs = await self.sync_state.find({"source": source}).to_list(None)
        return {d["stream"]: d["checkpoint"] for d in docs}

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None:
        """Record that everything up to ``checkpoint`` is stored."""
        self.round_trips += 1
        await self.sync_state.replace_one(
            {"_id": f"{source}/{stream}"},
            {"source": source, "stream": stream, "checkpoint": dict(checkpoint), "updated_at": now_utc()},
            upsert=True,
        )

    # -- records and histories -----------------------------------------------

    async def write_batch(
        self, records: Sequence[Mapping[str, Any]], *, drop_sources: Mapping[str, Any] | None = None
    ) -> BatchResult:
        """Upsert ``records`` (matched to customers) and refresh the histories they touch."""
        start = self.round_trips
        if drop_sources:
            # The remote ids these entries name are void (a new UIDVALIDITY): the
            # re-read adds fresh entries, so forget the stale ones.
            self.round_trips += 1
            await self.records.update_many(
                {"sources": {"$elemMatch": dict(drop_sources)}}, {"$pull": {"sources": dict(drop_sources)}}
            )
        merged = _merge_duplicates(records)
        if not merged:
            return BatchResult(0, 0, 0, self.round_trips - start)
        ids = list(merged)

        self.round_trips += 1
        previous = await self.records.find({"_id": {"$in": ids}}, {"customer_ids": 1}).to_list(None)
        touched: set[Any] = {cid for doc in previous for cid in doc.get("customer_ids", ())}

        by_key = await self._customers_for(merged.values())
        now = now_utc()
        ops = []
        for rid, record in merged.items():
            customer_ids = matching.assign(record, by_key)
            touched.update(customer_ids)
            fields = {k: v for k, v in record.items() if k not in _KEEP}
            fields["customer_ids"] = customer_ids
            ops.append(
                UpdateOne(
                    {"_id": rid},
                    {
                        "$set": fields,
                        "$addToSet": {"sources": {"$each": list(record.get("sources", ()))}},
                        "$setOnInsert": {"ingested_at": now},
                    },
                    upsert=True,
                )
            )
        self.round_trips += 1
        result = await self.records.bulk_write(ops, ordered=False)
        await self.refresh_history(touched)
        return BatchResult(len(merged), result.upserted_count, len(touched), self.round_trips - start)

    async def _customers_for(self, records: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
        addresses = set().union(*(matching.external_addresses(r) for r in records))
        if not addresses:
            return {}
        self.round_trips += 1
        customers = await self.customers.find(matching.customer_filter(addresses), {"emails": 1}).to_list(None)
        return matching.index_customers(customers)

    async def refresh_history(self, customer_ids: Iterable[Any]) -> int:
        """Recompute the history documents of ``customer_ids`` from their records."""
        wanted = sorted(set(customer_ids), key=str)
        if not wanted:
            return 0
        self.round_trips += 1
        rows = await self.records.aggregate(history.pipeline(wanted)).to_list(None)
        docs = history.documents(rows, now=now_utc())
        ops: list[Any] = [ReplaceOne({"_id": cid}, doc, upsert=True) for cid, doc in docs.items()]
        # A customer left with no records has no history.
        ops += [DeleteOne({"_id": cid}) for cid in wanted if cid not in docs]
        self.round_trips += 1
        await self.history.bulk_write(ops, ordered=False)
        return len(docs)

    async def rebuild_history(self, *, write: bool = False) -> dict[Any, dict[str, Any]]:
        """History of every customer computed from scratch; stored too when ``write``."""
        rows = await self.records.aggregate(history.pipeline(None)).to_list(None)
        docs = history.documents(rows, now=now_utc())
        if write:
            await self.history.delete_many({"_id": {"$nin": list(docs)}})
            if docs:
                await self.history.bulk_write([ReplaceOne({"_id": k}, v, upsert=True) for k, v in docs.items()])
        return docs


def _merge_duplicates(records: Iterable[Mapping[str, Any]]) -> dict[Any, dict[str, Any]]:
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


_PATCHED = False


def patch_mongomock() -> None:
    """Let mongomock 4.3's bulk builder accept the keywords pymongo >= 4.11 passes.

    pymongo's UpdateOne/ReplaceOne hand ``sort=`` to the bulk builder;
    mongomock's builder predates it and raises TypeError. Dropping a ``None``
    sort changes nothing; a real one is refused loudly.
    """
    global _PATCHED
    if _PATCHED:
        return
    from mongomock.collection import BulkOperationBuilder

    for name in ("add_update", "add_replace"):
        original = getattr(BulkOperationBuilder, name)

        def accepting_sort(self, *args, _original=original, sort=None, **kwargs):
            if sort is not None:
                raise NotImplementedError("mongomock cannot sort in a bulk update")
            return _original(self, *args, **kwargs)

        setattr(BulkOperationBuilder, name, accepting_sort)
    _PATCHED = True


__all__ = ["BatchResult", "Store", "now_utc", "patch_mongomock", "pymongo"]
