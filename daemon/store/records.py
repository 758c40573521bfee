"""The capture path: a batch's reads, its upserts and their histories (see histories.py); matching, tombstones, customers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson
import pymongo.errors
import structlog
from pymongo import ReplaceOne, UpdateOne

from commsync.connectors.base import MalformedItem

from .. import capture, history, matching, policy, schema
from ..text import cut
from . import memory
from .base import now_utc
from .histories import HistoryMixin, Retry, as_stored
from .refusals import refusal, sanitized

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
    # The customers whose records the batch wrote (before or after): `customers` of them.
    touched: tuple[Any, ...] = ()


class RecordsMixin(HistoryMixin):
    """The capture path of the store."""

    @sanitized
    async def write_batch(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        drop_sources: Mapping[str, Any] | None = None,
        source: str | None = None,
        stream: str | None = None,
        malformed: Sequence[MalformedItem] = (),
    ) -> BatchResult:
        """Upsert ``records`` (matched to customers) and bring the histories they touch along.

        With transactions the upsert and the history changes are one
        transaction (histories.py); without, the touched customers are
        recomputed after the upsert.

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
            # What the ledger says of those ids is void too (verify would count other messages as excluded).
            await self.forget_excluded(drop_sources)
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
        deltas = await self.uses_transactions()
        if deltas:
            inserted, refused = await self._upsert_keeping_history(ops)
        else:
            inserted, refused = await self._bulk_upsert(ops)
        refused += oversized
        if refused:
            quarantined += await self.quarantine_records(source, stream, refused)
        if not deltas:
            await self.refresh_history(plan.touched)
        refused_ids = tuple(record["_id"] for record, _ in refused)
        stored = len(ops) - len(refused) + len(oversized)
        return BatchResult(stored, inserted, len(plan.touched), plan.dropped, quarantined, refused_ids, tuple(plan.touched))

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
            if details.get("writeConcernErrors"):
                failed = refusal(exc)
            else:
                return int(details.get("nUpserted", 0)), _refused(ops, details.get("writeErrors", ()))
        # Outside the except block: the driver's error is neither cause nor context of this one.
        raise failed from None

    async def _upsert_keeping_history(self, ops: list[UpdateOne]) -> tuple[int, list[tuple[dict[str, Any], str]]]:
        """The records' bulk upsert and what it changes in histories, one transaction; (inserted, the records refused).

        A write error aborts a transaction: the records the server refused
        leave the batch and the transaction runs again without them (one
        more attempt per refusal on MongoDB, which stops at the first).
        """
        refused: list[tuple[dict[str, Any], str]] = []
        while ops:
            try:
                async with self._history_lock:
                    return await self.in_transaction(lambda session, ops=ops: self._upsert_in(ops, session)), refused
            except _Refused as exc:
                refused += exc.refused
                gone = {id(op) for op in exc.ops}
                ops = [op for op in ops if id(op) not in gone]
        return 0, refused

    async def _upsert_in(self, ops: list[UpdateOne], session: Any) -> int:
        before = await self.read_contributions([op._filter["_id"] for op in ops], session)
        try:
            result = await self.records.bulk_write(ops, ordered=False, session=session)
        except pymongo.errors.BulkWriteError as exc:
            errors = exc.details.get("writeErrors", ())
            if not errors or any(err.get("code") in _COLLISIONS for err in errors):
                raise Retry from None
            raise _Refused([ops[err["index"]] for err in errors], _refused(ops, errors)) from None
        after = {}
        for op in ops:
            rid = op._filter["_id"]
            fields = op._doc["$set"]
            after[rid] = as_stored({**before.get(rid, {"_id": rid}), **{k: fields[k] for k in _CONTRIBUTING if k in fields}})
        await self.apply_history_changes(before, after, session)
        return result.upserted_count

    async def _customers_by_key(self, addresses: set[str]) -> dict[str, list[Any]]:
        # One query for emails and phone numbers alike ($or), whatever the batch size.
        if not addresses:
            return {}
        query = matching.customer_filter(addresses, self.default_region)
        customers = await self.customers.find(query, {"emails": 1, "phones": 1}).to_list(None)
        return matching.index_customers(customers, self.default_region)

    @sanitized
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

    # -- matching, customers, tombstones, suppression ------------------------------------------

    async def match(self, records: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """The customer ids each of ``records`` matches now (one customer lookup)."""
        by_key = await self._customers_by_key(set().union(*(matching.external_addresses(r) for r in records)) if records else set())
        return [matching.assign(r, by_key) for r in records]

    @sanitized
    async def set_customer_ids(self, changes: Mapping[Any, Sequence[Any]]) -> None:
        """Re-link records: ``changes`` maps record ids to their new customer ids."""
        if changes:
            ops = [UpdateOne({"_id": rid}, {"$set": {"customer_ids": list(cids)}}) for rid, cids in changes.items()]
            await self.change_records(list(changes), lambda session: self.records.bulk_write(ops, ordered=False, session=session))

    @sanitized
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
        ids = [d["_id"] for d in docs]
        result = await self.change_records(ids, lambda session: self.records.delete_many({"_id": {"$in": ids}}, session=session), deletes=True)
        return result.deleted_count

    @sanitized
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

    @sanitized
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

    @sanitized
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


# The top-level fields of a record `history.FIELDS` reads: what a batch's $set may change in histories.
_CONTRIBUTING = tuple(dict.fromkeys(path.split(".")[0] for path in history.FIELDS))
# Write errors that are a collision with another writer, not a refusal: the transaction runs again.
_COLLISIONS = frozenset({112, 11000})  # WriteConflict, DuplicateKey (a concurrent insert of the same _id)


class _Refused(Exception):
    """The server refused some of a transaction's records."""

    def __init__(self, ops: list[UpdateOne], refused: list[tuple[dict[str, Any], str]]):
        super().__init__(f"{len(refused)} records refused")
        self.ops = ops
        self.refused = refused


def _refused(ops: Sequence[UpdateOne], errors: Iterable[Mapping[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The records of ``ops`` that ``errors`` (a BulkWriteError's writeErrors) name, with why."""
    refused = []
    for err in errors:
        op = ops[err["index"]]
        doc = {"_id": op._filter["_id"], **op._doc["$set"], "sources": op._doc["$addToSet"]["sources"]["$each"]}
        # A duplicate key's message quotes the key's value (an address under a unique index): not kept.
        reason = str(err.get("errmsg", "")).split(" dup key:")[0]
        refused.append((doc, f"server refused the record (code {err.get('code')}: {cut(reason, 200)})"))
    log.warning("records_refused", records=[d["_id"] for d, _ in refused][:20], count=len(refused))
    return refused


def _size_beyond(fields: Mapping[str, Any], limit: int) -> bool:
    """True when ``fields`` encode to more than ``limit`` bytes; exact only for records that could be."""
    rough = sum(len(v) for v in fields.values() if isinstance(v, str)) + 200 * sum(len(v) for v in fields.values() if isinstance(v, list))
    return rough > _SURELY_SMALL and _size(fields) > limit


def _size(fields: Mapping[str, Any]) -> int:
    try:
        return len(bson.encode(dict(fields)))
    except (bson.errors.InvalidDocument, OverflowError):
        return MAX_DOCUMENT_BYTES + 1


__all__ = ["BatchResult", "RecordsMixin"]
