"""Customer histories: kept by deltas inside the writes' transactions, or recomputed where there are none.

On a server with multi-document transactions (a replica set, even of one
member; mongos) a write of records and the change it makes to histories are
one transaction: the records' previous state, their new state and the touched
customers' documents are read in one snapshot, `history.apply` computes the new
documents, and the commit makes both visible at once or neither. Its cost
follows the write, not the customers' past. Two writers touching one document
collide on it (WriteConflict); the later one starts again from a fresh snapshot,
so a delta is applied exactly once.

Without transactions (a standalone mongod, ``memory://``) a writer stores its
records, then recomputes the touched customers from all their records
(`history.pipeline`); per customer, a counter in `history_revisions` keeps an
older recomputation from overwriting a newer one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import bson
import pymongo.errors
import structlog
from bson.codec_options import CodecOptions
from pymongo import DeleteOne, ReplaceOne, UpdateOne
from pymongo.read_concern import ReadConcern

from .. import history
from .base import StoreBase, now_utc
from .refusals import refusal, sanitized

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Give up on a transaction that keeps colliding after this long (as pymongo's with_transaction does).
TRANSACTION_TIME_LIMIT = 120.0
# Between attempts after a collision: jittered, growing, capped. A writer killed mid-transaction
# holds its documents until the server drops the transaction (60 s by default): no busy loop meanwhile.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.005, 0.5
# Customers per transaction when a whole database is recomputed or checked.
CHUNK = 500
# How the server stores what a batch sends (UTC, milliseconds): contributions are computed from that.
_AS_STORED = CodecOptions(tz_aware=True)


@dataclass(frozen=True, slots=True)
class HistoryCheck:
    customers: int  # with a stored history, records, or both
    differences: dict[Any, list[str]]  # customer -> what differs (see `history.differences`)


class Retry(Exception):
    """A collision the server reported as a write error (not a labelled error): run the transaction again."""


class HistoryMixin(StoreBase):
    """`customer_history`: refresh, rebuild, check, and the delta path of writes to records."""

    # Whether writes keep histories by deltas in transactions; None: ask the server at first use.
    transactions: bool | None = None
    # Transactions started again after a collision with another writer (tests and benchmarks read it).
    collisions = 0

    async def uses_transactions(self) -> bool:
        """True when the server runs multi-document transactions (its `hello` names a replica set, or it is a mongos)."""
        if self.transactions is None:
            if self.memory:
                self.transactions = False
            else:
                try:
                    hello = await self.client.admin.command("hello")
                except pymongo.errors.OperationFailure:  # before MongoDB 4.4.2
                    hello = await self.client.admin.command("isMaster")
                self.transactions = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"
                log.info("history_mode", transactions=self.transactions)
        return self.transactions

    async def in_transaction(self, work: Callable[[Any], Awaitable[T]], *, read_concern: ReadConcern | None = None) -> T:
        """Run ``work(session)`` in a transaction and commit it, again from the start after a collision.

        ``work`` may run several times and must have no effect outside the
        session. Errors that are not collisions abort the transaction and
        propagate.
        """
        started = time.monotonic()
        attempt = 0
        async with await self.client.start_session() as session:
            while True:
                session.start_transaction(read_concern=read_concern)
                try:
                    result = await work(session)
                    await self._commit(session, started)
                    return result
                except Exception as exc:
                    if session.in_transaction:
                        await _abort(session)
                    if not _collision(exc) or time.monotonic() - started > TRANSACTION_TIME_LIMIT:
                        raise
                attempt += 1
                self.collisions += 1
                if attempt % 20 == 0:
                    log.warning("history_transaction_retrying", attempts=attempt, seconds=round(time.monotonic() - started, 1))
                await asyncio.sleep(random.random() * min(_BACKOFF_FIRST * 1.5**attempt, _BACKOFF_MAX))  # noqa: S311

    async def _commit(self, session: Any, started: float) -> None:
        while True:
            try:
                await session.commit_transaction()
                return
            except pymongo.errors.PyMongoError as exc:
                # The commit may have happened: committing again is safe and tells. Not while the
                # server is unreachable: the batch fails, and its re-read finds what was committed.
                unknown = exc.has_error_label("UnknownTransactionCommitResult") and not isinstance(exc, pymongo.errors.ConnectionFailure)
                if unknown and time.monotonic() - started <= TRANSACTION_TIME_LIMIT:
                    continue
                raise

    # -- the delta path ------------------------------------------------------------------------

    async def read_contributions(self, ids: Sequence[Any], session: Any) -> dict[Any, dict[str, Any]]:
        """The history `FIELDS` of the records ``ids`` that exist, by id, in ``session``'s snapshot."""
        if not ids:
            return {}
        found = await self.records.find({"_id": {"$in": list(ids)}}, history.FIELDS, session=session).to_list(None)
        return {d["_id"]: d for d in found}

    async def apply_history_changes(
        self, before: Mapping[Any, Mapping[str, Any]], after: Mapping[Any, Mapping[str, Any]], session: Any
    ) -> int:
        """Bring the histories from records in state ``before`` to state ``after``, inside ``session``'s transaction.

        One read of the touched customers' documents and one bulk write; an
        aggregation too, over the few customers `history.apply` cannot update
        (a removal took a channel's first or last record). How many customers changed.
        """
        changes = history.changes(before, after)
        if not changes:
            return 0
        stored = {d["_id"]: d for d in await self.history.find({"_id": {"$in": list(changes)}}, session=session).to_list(None)}
        now = now_utc()
        docs: dict[Any, dict[str, Any] | None] = {}
        again = []
        for cid, change in changes.items():
            doc = history.apply(stored.get(cid), change, customer=cid, now=now)
            if doc is history.RECOMPUTE:
                again.append(cid)
            else:
                docs[cid] = doc  # type: ignore[assignment]
        if again:
            log.debug("history_recomputed", customers=len(again))
            rows = await self.records.aggregate(history.pipeline(again), session=session).to_list(None)
            recomputed = history.documents(rows, now=now)
            docs.update({cid: recomputed.get(cid) for cid in again})
        await self._write_history(list(docs), {cid: d for cid, d in docs.items() if d is not None}, {}, session=session)
        return len(docs)

    @sanitized
    async def change_records(self, ids: Sequence[Any], change: Callable[[Any], Awaitable[T]], *, deletes: bool = False) -> T:
        """Run ``change(session)``, a write to the records ``ids``, with the history changes it makes, in one transaction.

        For writes besides capture's (admin deletes and re-links): a crash
        between the records and their histories cannot happen. Without
        transactions ``change(None)`` runs alone and the caller refreshes the
        histories. ``deletes``: the records are gone afterwards (no need to read them).
        """
        if not await self.uses_transactions():
            return await change(None)

        async def work(session: Any) -> T:
            before = await self.read_contributions(ids, session)
            result = await change(session)
            after = {} if deletes else await self.read_contributions(ids, session)
            await self.apply_history_changes(before, after, session)
            return result

        async with self._history_lock:
            return await self.in_transaction(work)

    @sanitized
    async def settle_histories(self, customer_ids: Iterable[Any]) -> None:
        """After `change_records` writes: recompute ``customer_ids`` where the server had no transaction to keep them current."""
        if not await self.uses_transactions():
            await self.refresh_history(customer_ids)

    # -- recomputation -------------------------------------------------------------------------

    @sanitized
    async def refresh_history(self, customer_ids: Iterable[Any]) -> int:
        """Recompute the history documents of ``customer_ids`` from their records; how many have one.

        Callers have stored their record changes already. With transactions the
        aggregation and the write are one transaction (a concurrent batch
        collides with it and one of them starts again). Without, bumping the
        revisions first, then reading them, then aggregating means a
        computation at revision r has seen every change made before r.
        """
        wanted = sorted(set(customer_ids), key=str)
        if not wanted:
            return 0
        if await self.uses_transactions():
            async with self._history_lock:
                docs = await self.in_transaction(lambda session: self._recompute(wanted, session))
            return len(docs)
        async with self._history_lock:
            await self.revisions.bulk_write([UpdateOne({"_id": cid}, {"$inc": {"rev": 1}}, upsert=True) for cid in wanted], ordered=False)
            revs = await self._revisions(wanted)
            rows = await self.records.aggregate(history.pipeline(wanted)).to_list(None)
            docs = history.documents(rows, now=now_utc())
            await self._write_history(wanted, docs, revs)
        return len(docs)

    async def _recompute(self, wanted: Sequence[Any], session: Any) -> dict[Any, dict[str, Any]]:
        rows = await self.records.aggregate(history.pipeline(wanted), session=session).to_list(None)
        docs = history.documents(rows, now=now_utc())
        await self._write_history(wanted, docs, {}, session=session)
        return docs

    async def _revisions(self, customer_ids: Sequence[Any] | None) -> dict[Any, int]:
        query = {} if customer_ids is None else {"_id": {"$in": list(customer_ids)}}
        return {d["_id"]: d["rev"] for d in await self.revisions.find(query).to_list(None)}

    async def _write_history(
        self, wanted: Iterable[Any], docs: Mapping[Any, dict[str, Any]], revs: Mapping[Any, int], *, session: Any = None
    ) -> None:
        """Store ``docs`` and delete the histories of ``wanted`` customers without one (no records left).

        In a transaction (``session``) the write is plain: a concurrent writer
        collides with it. Without, a document is written only if the stored one
        is not of a newer revision.
        """
        ops: list[Any] = []
        for cid in wanted:
            doc = docs.get(cid)
            if session is not None:
                # $set, not a replacement: a `revision` from a time without transactions stays as it was.
                ops.append(UpdateOne({"_id": cid}, {"$set": {k: v for k, v in doc.items() if k != "_id"}}, upsert=True) if doc else DeleteOne({"_id": cid}))
                continue
            rev = revs.get(cid, 0)
            newest = {"_id": cid, "$or": [{"revision": {"$lte": rev}}, {"revision": {"$exists": False}}]}
            # A customer left with no records has no history.
            ops.append(ReplaceOne(newest, {**doc, "revision": rev}, upsert=True) if doc else DeleteOne(newest))
        if not ops:
            return
        if session is not None:
            await self.history.bulk_write(ops, ordered=False, session=session)
            return
        try:
            await self.history.bulk_write(ops, ordered=False)
            return
        except pymongo.errors.BulkWriteError as exc:
            # A newer revision is stored already: the upsert of the older one collides on _id and stays out.
            if all(err.get("code") == 11000 for err in exc.details.get("writeErrors", ())):
                return
            failed = refusal(exc)  # its text holds the history documents
        raise failed from None

    # -- rebuild and check -----------------------------------------------------------------------

    @sanitized
    async def rebuild_history(self, *, write: bool = False) -> dict[Any, dict[str, Any]]:
        """History of every customer computed from scratch; stored too when ``write``.

        A document carries the customer's `history_revisions` counter (written
        only without transactions) when it has one, as the stored ones do.
        With transactions, ``write`` recomputes the customers in chunks, each in
        a transaction of its own, so capture can go on meanwhile.
        """
        if write and await self.uses_transactions():
            stored = [d["_id"] for d in await self.history.find({}, {"_id": 1}).to_list(None)]
            everyone = list(dict.fromkeys([*await self._customers_with_records(), *stored]))
            docs = {}
            for i in range(0, len(everyone), CHUNK):
                chunk = everyone[i : i + CHUNK]
                async with self._history_lock:
                    docs.update(await self.in_transaction(lambda session, chunk=chunk: self._recompute(chunk, session)))
            return await self._with_revisions(docs, default=None)
        async with self._history_lock:
            rows = await self.records.aggregate(history.pipeline(None)).to_list(None)
            # Without transactions every stored document has a revision (0 when none was counted).
            docs = await self._with_revisions(history.documents(rows, now=now_utc()), default=None if await self.uses_transactions() else 0)
            if write:
                stored = [d["_id"] for d in await self.history.find({}, {"_id": 1}).to_list(None)]
                await self._write_history(set(stored) | set(docs), docs, await self._revisions(None))
        return docs

    async def _with_revisions(self, docs: Mapping[Any, dict[str, Any]], *, default: int | None) -> dict[Any, dict[str, Any]]:
        revs = await self._revisions(None)
        if default is not None:
            return {cid: {**doc, "revision": revs.get(cid, default)} for cid, doc in docs.items()}
        return {cid: {**doc, "revision": revs[cid]} if cid in revs else dict(doc) for cid, doc in docs.items()}

    async def _customers_with_records(self) -> list[Any]:
        rows = await self.records.aggregate([{"$unwind": "$customer_ids"}, {"$group": {"_id": "$customer_ids"}}]).to_list(None)
        return [r["_id"] for r in rows]

    async def stored_histories(self) -> dict[Any, dict[str, Any]]:
        """Every stored history document, by customer."""
        return {d["_id"]: d for d in await self.history.find().to_list(None)}

    async def check_history(self) -> HistoryCheck:
        """Compare every stored history with a rebuild, writing nothing; what differs, by customer.

        The whole database is compared first; each customer that differs is
        then compared again, its records and its document read together (in
        one snapshot where the server has transactions), so a batch stored
        between the two reads of the first pass is not reported.
        """
        stored, rebuilt = await self.stored_histories(), await self.rebuild_history()
        customers = len(stored.keys() | rebuilt.keys())
        candidates = history.differences(stored, rebuilt)
        if not candidates:
            return HistoryCheck(customers, {})
        confirmed: dict[Any, list[str]] = {}
        ids = list(candidates)
        for i in range(0, len(ids), CHUNK):
            chunk = ids[i : i + CHUNK]
            if await self.uses_transactions():
                found = await self.in_transaction(lambda session, chunk=chunk: self._compare(chunk, session), read_concern=ReadConcern("snapshot"))
            else:
                found = await self._compare(chunk, None)
            confirmed.update(found)
        return HistoryCheck(customers, confirmed)

    async def _compare(self, customer_ids: Sequence[Any], session: Any) -> dict[Any, list[str]]:
        rows = await self.records.aggregate(history.pipeline(customer_ids), session=session).to_list(None)
        stored = await self.history.find({"_id": {"$in": list(customer_ids)}}, session=session).to_list(None)
        return history.differences({d["_id"]: d for d in stored}, history.documents(rows, now=now_utc()))


def _collision(exc: BaseException) -> bool:
    """A conflict with another writer, worth starting the transaction again at once.

    An unreachable server is not one, though the driver labels it transient
    too: the batch fails and the runner's backoff, which knows outages, takes over.
    """
    if isinstance(exc, Retry):
        return True
    return (
        isinstance(exc, pymongo.errors.PyMongoError)
        and exc.has_error_label("TransientTransactionError")
        and not isinstance(exc, pymongo.errors.ConnectionFailure)
    )


def as_stored(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` as the server gives it back: datetimes in UTC to the millisecond, numbers as BSON keeps them."""
    return bson.decode(bson.encode(dict(doc)), codec_options=_AS_STORED)


async def _abort(session: Any) -> None:
    try:
        await session.abort_transaction()
    except pymongo.errors.PyMongoError:
        pass  # the server aborts it anyway (its lifetime); nothing of it was committed
