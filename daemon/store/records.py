"""Records and customer histories: a batch's reads, its upserts, and the history refresh."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson
import pymongo.errors
import structlog
from pymongo import DeleteOne, ReplaceOne, UpdateOne

from commsync.connectors.base import MalformedItem

from .. import capture, history, matching, policy, schema
from ..text import cut
from . import memory
from .base import HISTORY, REVISIONS, StoreBase, now_utc

log = structlog.get_logger(__name__)

# Fields a re-read must not overwrite: identity, provenance, first sighting.
_KEEP = frozenset({"_id", "sources", "ingested_at", "customer_ids"})
# MongoDB refuses documents over 16 MiB; a record this big is quarantined instead of failing its batch.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024 - 64 * 1024
# Records whose text alone stays under this are not measured exactly (encoding costs CPU).
_SURELY_SMALL = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BatchResult:
    records: int
    inserted: int
    customers: int
    # Records of the batch left out by the capture policy, by reason.
    not_captured: Mapping[str, int] = field(default_factory=dict)
    # Items put into quarantine: unreadable at the source, or refused by the server.
    quarantined: int = 0
    # Ids of the batch's records the server refused (they are in quarantine).
    refused: tuple[Any, ...] = ()


class RecordsMixin(StoreBase):
    """The capture path of the store."""

    async def write_batch(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        drop_sources: Mapping[str, Any] | None = None,
        source: str | None = None,
        stream: str | None = None,
        malformed: Sequence[MalformedItem] = (),
    ) -> BatchResult:
        """Upsert ``records`` (matched to customers) and refresh the histories they touch.

        The capture policy applies first: automated, blocklisted, too old,
        deleted (tombstoned) and suppressed records are left out, suppressed
        participants are removed from the rest, and with ``capture.policy:
        matched`` new records that match no customer are left out too. Items
        the connector could not read (``malformed``) and records the server
        refuses go to quarantine; they never fail the batch.
        """
        if drop_sources:
            # The remote ids these entries name are void (a new UIDVALIDITY): the
            # re-read adds fresh entries, so mark the stale ones gone.
            await self.retire_sources(drop_sources)
        quarantined = 0
        if malformed:
            quarantined += await self.quarantine_items(source, stream, malformed)
        now = now_utc()
        screened = capture.screen(records, self.capture, now)
        if not screened.records:
            await self.note_excluded(source, stream, screened.left_out)
            return BatchResult(0, 0, 0, screened.dropped, quarantined)
        region = self.default_region
        ids, digests, addresses = capture.lookup_keys(screened, region)
        # Independent reads, sent together: the wait of one round trip.
        previous, dead, suppressed, by_key = await asyncio.gather(
            self.records.find({"_id": {"$in": ids}}, {"customer_ids": 1}).to_list(None),
            self.tombstones.find({"_id": {"$in": ids}}, {"_id": 1}).to_list(None),
            self.suppressions.find({"_id": {"$in": digests}}, {"_id": 1}).to_list(None),
            self._customers_by_key(addresses),
        )
        found = capture.Lookups(
            previous={d["_id"]: d.get("customer_ids", []) for d in previous},
            tombstoned=frozenset(d["_id"] for d in dead),
            suppressed=frozenset(d["_id"] for d in suppressed),
            by_key=by_key,
        )
        plan = capture.plan(screened, found, self.capture, region)
        await self.note_excluded(source, stream, plan.left_out)
        if not plan.records:
            return BatchResult(0, 0, 0, plan.dropped, quarantined)
        if plan.create:
            await self.create_customers(plan.create)
        ops, oversized = self._upserts(plan, now)
        inserted, refused = await self._bulk_upsert(ops)
        refused += oversized
        if refused:
            quarantined += await self.quarantine_records(source, stream, refused)
        await self.refresh_history(plan.touched)
        refused_ids = tuple(record["_id"] for record, _ in refused)
        return BatchResult(len(ops) - len(refused) + len(oversized), inserted, len(plan.touched), plan.dropped, quarantined, refused_ids)

    def _upserts(self, plan: capture.Plan, now: Any) -> tuple[list[UpdateOne], list[tuple[dict[str, Any], str]]]:
        ops, oversized = [], []
        for rid, record in plan.records.items():
            fields = {k: v for k, v in record.items() if k not in _KEEP}
            fields["customer_ids"] = plan.customer_ids[rid]
            fields["schema_version"] = schema.SCHEMA_VERSION
            if _size_beyond(fields, MAX_DOCUMENT_BYTES):
                oversized.append((record, f"document too large ({_size(fields)} bytes)"))
                continue
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
        return ops, oversized

    async def _bulk_upsert(self, ops: list[UpdateOne]) -> tuple[int, list[tuple[dict[str, Any], str]]]:
        """Send the upserts as one unordered bulk write; (inserted, the records the server refused with why)."""
        if not ops:
            return 0, []
        try:
            result = await self.records.bulk_write(ops, ordered=False)
            return result.upserted_count, []
        except pymongo.errors.BulkWriteError as exc:
            # Never log exc or its details: they hold the documents themselves.
            details = exc.details
            refused = []
            for err in details.get("writeErrors", ()):
                op = ops[err["index"]]
                doc = {"_id": op._filter["_id"], **op._doc["$set"], "sources": op._doc["$addToSet"]["sources"]["$each"]}
                refused.append((doc, f"server refused the record (code {err.get('code')}: {cut(str(err.get('errmsg', '')), 200)})"))
            if details.get("writeConcernErrors"):
                raise
            log.warning("records_refused", records=[d["_id"] for d, _ in refused][:20], count=len(refused))
            return int(details.get("nUpserted", 0)), refused

    async def _customers_by_key(self, addresses: set[str]) -> dict[str, list[Any]]:
        # One query for emails and phone numbers alike ($or), whatever the batch size.
        if not addresses:
            return {}
        query = matching.customer_filter(addresses, self.default_region)
        customers = await self.customers.find(query, {"emails": 1, "phones": 1}).to_list(None)
        return matching.index_customers(customers, self.default_region)

    async def retire_sources(self, stale: Mapping[str, Any], *, record_ids: Sequence[Any] | None = None) -> int:
        """Mark source entries whose remote ids are void (a folder's new UIDVALIDITY, a renamed folder) gone.

        The record keeps them, with ``gone_at``: the contact happened, and the
        record says it is no longer where it was seen. A re-read adds a fresh
        entry beside it when the message is still there.
        """
        query: dict[str, Any] = {"sources": {"$elemMatch": {**stale, "gone_at": {"$exists": False}}}}
        if record_ids is not None:
            query["_id"] = {"$in": list(record_ids)}
        now = now_utc()
        if self.memory:
            return await memory.retire_sources(self.records, query, stale, now)
        result = await self.records.update_many(
            query,
            {"$set": {"sources.$[old].gone_at": now}},
            array_filters=[{**{f"old.{k}": v for k, v in stale.items()}, "old.gone_at": {"$exists": False}}],
        )
        return result.modified_count

    # -- histories -------------------------------------------------------------------------

    async def refresh_history(self, customer_ids: Iterable[Any]) -> int:
        """Recompute the history documents of ``customer_ids`` from their records.

        Callers have stored their record changes already. Bumping the
        revisions first, then reading them, then aggregating means a
        computation at revision r has seen every change made before r.
        """
        wanted = sorted(set(customer_ids), key=str)
        if not wanted:
            return 0
        async with self._history_lock:
            await self.revisions.bulk_write([UpdateOne({"_id": cid}, {"$inc": {"rev": 1}}, upsert=True) for cid in wanted], ordered=False)
            revs = await self._revisions(wanted)
            rows = await self.records.aggregate(history.pipeline(wanted)).to_list(None)
            docs = history.documents(rows, now=now_utc())
            await self._write_history(wanted, docs, revs)
        return len(docs)

    async def _revisions(self, customer_ids: Sequence[Any] | None) -> dict[Any, int]:
        query = {} if customer_ids is None else {"_id": {"$in": list(customer_ids)}}
        return {d["_id"]: d["rev"] for d in await self.revisions.find(query).to_list(None)}

    async def _write_history(self, wanted: Iterable[Any], docs: Mapping[Any, dict[str, Any]], revs: Mapping[Any, int]) -> None:
        """Store ``docs`` (and delete the histories of ``wanted`` customers without records), unless newer ones are there."""
        ops: list[Any] = []
        for cid in wanted:
            rev = revs.get(cid, 0)
            newest = {"_id": cid, "$or": [{"revision": {"$lte": rev}}, {"revision": {"$exists": False}}]}
            if cid in docs:
                ops.append(ReplaceOne(newest, {**docs[cid], "revision": rev}, upsert=True))
            else:
                # A customer left with no records has no history.
                ops.append(DeleteOne(newest))
        if not ops:
            return
        try:
            await self.history.bulk_write(ops, ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            # A newer revision is stored already: the upsert of the older one collides on _id and stays out.
            if any(err.get("code") != 11000 for err in exc.details.get("writeErrors", ())):
                raise

    async def rebuild_history(self, *, write: bool = False) -> dict[Any, dict[str, Any]]:
        """History of every customer computed from scratch; stored too when ``write``.

        Each document carries the customer's current revision, so a rebuild
        equals the stored histories exactly when they are up to date.
        """
        async with self._history_lock:
            revs = await self._revisions(None)
            rows = await self.records.aggregate(history.pipeline(None)).to_list(None)
            docs = history.documents(rows, now=now_utc())
            docs = {cid: {**doc, "revision": revs.get(cid, 0)} for cid, doc in docs.items()}
            if write:
                stored = [d["_id"] for d in await self.history.find({}, {"_id": 1}).to_list(None)]
                await self._write_history(set(stored) | set(docs), docs, revs)
        return docs

    async def stored_histories(self) -> dict[Any, dict[str, Any]]:
        """Every stored history document, by customer."""
        return {d["_id"]: d for d in await self.history.find().to_list(None)}

    # -- matching, customers, tombstones, suppression ------------------------------------------

    async def match(self, records: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """The customer ids each of ``records`` matches now (one customer lookup)."""
        by_key = await self._customers_by_key(set().union(*(matching.external_addresses(r) for r in records)) if records else set())
        return [matching.assign(r, by_key) for r in records]

    async def set_customer_ids(self, changes: Mapping[Any, Sequence[Any]]) -> None:
        """Re-link records: ``changes`` maps record ids to their new customer ids."""
        if changes:
            ops = [UpdateOne({"_id": rid}, {"$set": {"customer_ids": list(cids)}}) for rid, cids in changes.items()]
            await self.records.bulk_write(ops, ordered=False)

    async def tombstone_and_delete(self, docs: Sequence[Mapping[str, Any]], reason: str) -> int:
        """Delete the records ``docs`` name, after leaving a tombstone for each that capture honours."""
        if not docs:
            return 0
        now = now_utc()
        # Tombstones first: a crash in between leaves a record that capture ignores and a re-run deletes.
        await self.tombstones.bulk_write(
            [
                ReplaceOne({"_id": d["_id"]}, {"reason": reason, "deleted_at": now, "occurred_at": d.get("occurred_at")}, upsert=True)
                for d in docs
            ],
            ordered=False,
        )
        result = await self.records.delete_many({"_id": {"$in": [d["_id"] for d in docs]}})
        return result.deleted_count

    async def suppress(self, digests: Iterable[str], reason: str) -> int:
        """Add `policy.suppression_key` digests to the suppression list; how many were new."""
        wanted = sorted(set(digests))
        if not wanted:
            return 0
        now = now_utc()
        result = await self.suppressions.bulk_write(
            [UpdateOne({"_id": d}, {"$setOnInsert": {"reason": reason, "added_at": now}}, upsert=True) for d in wanted],
            ordered=False,
        )
        return result.upserted_count

    async def create_customers(self, docs: Iterable[Mapping[str, Any]]) -> int:
        """Insert customers commsync made up, leaving any that already exist untouched; how many were new."""
        now = now_utc()
        ops = [
            UpdateOne({"_id": d["_id"]}, {"$setOnInsert": {**{k: v for k, v in d.items() if k != "_id"}, "created_at": now}}, upsert=True)
            for d in docs
        ]
        if not ops:
            return 0
        return (await self.customers.bulk_write(ops, ordered=False)).upserted_count

    async def upsert_customers(self, docs: Sequence[Mapping[str, Any]], origin: str) -> tuple[int, int]:
        """Insert or update customers {_id, name, emails, phones}; (inserted, updated)."""
        if not docs:
            return 0, 0
        now = now_utc()
        ops = [
            UpdateOne(
                {"_id": d["_id"]},
                {
                    "$set": {**{k: v for k, v in d.items() if k != "_id"}, "updated_at": now},
                    "$setOnInsert": {"created_by": policy.AUTO_CREATED_BY, "origin": origin, "created_at": now},
                },
                upsert=True,
            )
            for d in docs
        ]
        result = await self.customers.bulk_write(ops, ordered=False)
        return result.upserted_count, result.matched_count


def _size_beyond(fields: Mapping[str, Any], limit: int) -> bool:
    """True when ``fields`` encode to more than ``limit`` bytes; exact only for records that could be."""
    rough = sum(len(v) for v in fields.values() if isinstance(v, str)) + 200 * sum(len(v) for v in fields.values() if isinstance(v, list))
    return rough > _SURELY_SMALL and _size(fields) > limit


def _size(fields: Mapping[str, Any]) -> int:
    try:
        return len(bson.encode(dict(fields)))
    except (bson.errors.InvalidDocument, OverflowError):
        return MAX_DOCUMENT_BYTES + 1


__all__ = ["BatchResult", "RecordsMixin", "HISTORY", "REVISIONS"]
