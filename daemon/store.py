"""The MongoDB store: records, customer histories and checkpoints.

The only module that imports the driver. Every batch costs a fixed number of
round trips, whatever its size: four reads sent together (the records'
previous customers, tombstones, suppressed participants, one customer lookup),
one bulk upsert of records, then the history refresh: one bulk bump of the
customers' revisions, one read of them, one aggregation and one bulk write of
histories (plus one $pull when a folder was reset, and one bulk upsert when
customers are auto-created).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pymongo
import pymongo.errors
import structlog
from pymongo import DeleteOne, ReplaceOne, UpdateOne
from pymongo.errors import DuplicateKeyError

from . import history, matching, policy, schema

log = structlog.get_logger(__name__)

RECORDS = "records"
HISTORY = "customer_history"
SYNC_STATE = "sync_state"
# Deleted record ids capture must not bring back, and digests of forgotten people's addresses.
TOMBSTONES = "tombstones"
SUPPRESSIONS = "suppressions"
# Scale-out: who works which source (leases), which instances are alive, and
# each source's last outcome for `commsync status`.
LEASES = "leases"
INSTANCES = "instances"
SOURCE_STATUS = "source_status"
# Per customer, a counter every history recomputation bumps first: a history
# document carries the revision it was computed at, and an older computation
# finishing late cannot overwrite a newer one (writers run concurrently: two
# sources of one daemon, or several daemons).
REVISIONS = "history_revisions"

# Fields a re-read must not overwrite: identity, provenance, first sighting.
_KEEP = frozenset({"_id", "sources", "ingested_at", "customer_ids"})


@dataclass(frozen=True, slots=True)
class BatchResult:
    records: int
    inserted: int
    customers: int
    round_trips: int
    # Records of the batch left out by the capture policy, by reason.
    not_captured: Mapping[str, int] = field(default_factory=dict)


def now_utc() -> datetime:
    """Now, at the millisecond precision MongoDB stores."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Store:
    """Records, histories and checkpoints in one MongoDB database."""

    def __init__(
        self, client: Any, database: str, *, customers: str = "customers", memory: bool = False, default_region: str | None = None
    ):
        self.client = client
        # How customers' phone numbers written without a country code are read.
        self.default_region = default_region
        self.db = client[database]
        self.records = self.db[RECORDS]
        self.history = self.db[HISTORY]
        self.sync_state = self.db[SYNC_STATE]
        self.customers = self.db[customers]
        self.memory = memory
        self.tombstones = self.db[TOMBSTONES]
        self.suppressions = self.db[SUPPRESSIONS]
        self.revisions = self.db[REVISIONS]
        # Within one process recomputations of histories take turns (see REVISIONS for several).
        self._history_lock = asyncio.Lock()
        # Keep everything until configured (app.open_store sets the configured policy).
        self.capture = policy.CapturePolicy(region=default_region)
        # Round trips to the server since start; tests and benchmarks read it.
        self.round_trips = 0

    @classmethod
    def connect(
        cls, uri: str, database: str, *, customers: str = "customers", timeout_ms: int = 10_000, default_region: str | None = None
    ) -> Store:
        """A store on ``uri``; ``memory://`` gives a process-local mongomock store."""
        if uri.startswith("memory://"):
            from mongomock_motor import AsyncMongoMockClient

            patch_mongomock()
            return cls(AsyncMongoMockClient(tz_aware=True), database, customers=customers, memory=True, default_region=default_region)
        from motor.motor_asyncio import AsyncIOMotorClient

        client = AsyncIOMotorClient(uri, tz_aware=True, serverSelectionTimeoutMS=timeout_ms, appname="commsync")
        return cls(client, database, customers=customers, default_region=default_region)

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
        # Newest-first listing, --text and retention; --participant and re-matching by address.
        await self.records.create_index([("occurred_at", -1)], name="time")
        await self.records.create_index([("participants.address", 1), ("occurred_at", -1)], name="participant_time")
        await self.tombstones.create_index([("occurred_at", 1)], name="occurred")
        self.round_trips += 3

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
        """Upsert ``records`` (matched to customers) and refresh the histories they touch.

        The capture policy applies first: automated, blocklisted, too old,
        deleted (tombstoned) and suppressed records are left out, suppressed
        participants are removed from the rest, and with ``capture.policy:
        matched`` new records that match no customer are left out too.
        """
        start = self.round_trips
        if drop_sources:
            # The remote ids these entries name are void (a new UIDVALIDITY): the
            # re-read adds fresh entries, so forget the stale ones.
            self.round_trips += 1
            await self.records.update_many(
                {"sources": {"$elemMatch": dict(drop_sources)}}, {"$pull": {"sources": dict(drop_sources)}}
            )
        merged = _merge_duplicates(records)
        now = now_utc()
        dropped: dict[str, int] = {}

        def drop(rid: Any, reason: str) -> None:
            if merged.pop(rid, None) is not None:
                dropped[reason] = dropped.get(reason, 0) + 1

        for rid, record in list(merged.items()):
            reason = policy.screen(record, self.capture, now)
            if reason:
                drop(rid, reason)
        if not merged:
            return BatchResult(0, 0, 0, self.round_trips - start, _not_captured(dropped))
        ids = list(merged)
        region = self.default_region
        digests = sorted({policy.suppression_key(k) for r in merged.values() for k in policy.external_keys(r, region)})

        # Independent reads, sent together: the wait of one round trip.
        self.round_trips += 3
        previous, dead, suppressed, by_key = await asyncio.gather(
            self.records.find({"_id": {"$in": ids}}, {"customer_ids": 1}).to_list(None),
            self.tombstones.find({"_id": {"$in": ids}}, {"_id": 1}).to_list(None),
            self.suppressions.find({"_id": {"$in": digests}}, {"_id": 1}).to_list(None),
            self._customers_for(merged.values()),
        )
        before = {doc["_id"]: doc.get("customer_ids", ()) for doc in previous}
        for doc in dead:
            drop(doc["_id"], "tombstoned")
        hidden = {doc["_id"] for doc in suppressed}
        for rid, record in list(merged.items()):
            kept = policy.redact(record, hidden, region)
            if kept is None:
                drop(rid, "suppressed")
            else:
                merged[rid] = kept
        assigned = {rid: matching.assign(r, by_key) for rid, r in merged.items()}
        created = policy.customers_to_create(merged.values(), by_key, self.capture.auto_create)
        if created:
            await self.create_customers(created.values())
            by_key = {**by_key, **{key: [doc["_id"]] for key, doc in created.items()}}
            assigned = {rid: matching.assign(r, by_key) for rid, r in merged.items()}
        if self.capture.matched_only:
            # A stored record that no longer matches is updated, not left stale.
            for rid in [rid for rid, cids in assigned.items() if not cids and rid not in before]:
                drop(rid, "unmatched")
        if not merged:
            return BatchResult(0, 0, 0, self.round_trips - start, _not_captured(dropped))

        touched: set[Any] = set()
        ops = []
        for rid, record in merged.items():
            customer_ids = assigned[rid]
            touched.update(customer_ids)
            touched.update(before.get(rid, ()))
            fields = {k: v for k, v in record.items() if k not in _KEEP}
            fields["customer_ids"] = customer_ids
            fields["schema_version"] = schema.SCHEMA_VERSION
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
        return BatchResult(len(merged), result.upserted_count, len(touched), self.round_trips - start, _not_captured(dropped))

    async def _customers_for(self, records: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
        # One query for emails and phone numbers alike ($or), whatever the batch size.
        addresses = set().union(*(matching.external_addresses(r) for r in records))
        if not addresses:
            return {}
        self.round_trips += 1
        query = matching.customer_filter(addresses, self.default_region)
        customers = await self.customers.find(query, {"emails": 1, "phones": 1}).to_list(None)
        return matching.index_customers(customers, self.default_region)

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
            self.round_trips += 3
            await self.revisions.bulk_write(
                [UpdateOne({"_id": cid}, {"$inc": {"rev": 1}}, upsert=True) for cid in wanted], ordered=False
            )
            revs = await self._revisions(wanted)
            rows = await self.records.aggregate(history.pipeline(wanted)).to_list(None)
            docs = history.documents(rows, now=now_utc())
            self.round_trips += 1
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

    # -- admin: deletes, tombstones, suppression, customers, validators -------------

    async def match(self, records: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """The customer ids each of ``records`` matches now (one customer lookup)."""
        by_key = await self._customers_for(records)
        return [matching.assign(r, by_key) for r in records]

    async def set_customer_ids(self, changes: Mapping[Any, Sequence[Any]]) -> None:
        """Re-link records: ``changes`` maps record ids to their new customer ids."""
        if changes:
            self.round_trips += 1
            ops = [UpdateOne({"_id": rid}, {"$set": {"customer_ids": list(cids)}}) for rid, cids in changes.items()]
            await self.records.bulk_write(ops, ordered=False)

    async def tombstone_and_delete(self, docs: Sequence[Mapping[str, Any]], reason: str) -> int:
        """Delete the records ``docs`` name, after leaving a tombstone for each that capture honours."""
        if not docs:
            return 0
        now = now_utc()
        # Tombstones first: a crash in between leaves a record that capture ignores and a re-run deletes.
        self.round_trips += 2
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
        self.round_trips += 1
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
        self.round_trips += 1
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
        self.round_trips += 1
        result = await self.customers.bulk_write(ops, ordered=False)
        return result.upserted_count, result.matched_count

    async def init_db(self, *, strict: bool = False) -> bool:
        """Indexes and the $jsonSchema validators; False when they were not installed.

        memory:// ignores validators. A user without the right to change
        collections (collMod) gets a warning unless ``strict`` (`commsync init-db`):
        capture does not depend on the validators.
        """
        await self.ensure_indexes()
        try:
            return await self.install_validators()
        except pymongo.errors.OperationFailure as exc:
            if strict or exc.code != 13:  # 13: Unauthorized
                raise
            log.warning("validators_not_installed", reason=str(exc)[:200], hint="run `commsync init-db` as a user with dbAdmin")
            return False

    async def install_validators(self) -> bool:
        """Install the storage contract's validators on records and customer_history (level moderate)."""
        if self.memory:
            # mongomock has no collMod and ignores validators; tests check the schema itself.
            return False
        options = {"validationLevel": schema.VALIDATION_LEVEL, "validationAction": schema.VALIDATION_ACTION}
        wanted = {RECORDS: schema.RECORD_SCHEMA, HISTORY: schema.HISTORY_SCHEMA}
        self.round_trips += 1
        existing = set(await self.db.list_collection_names())
        for name, contract in wanted.items():
            self.round_trips += 1
            if name not in existing:
                try:
                    await self.db.create_collection(name, validator=schema.validator(contract), **options)
                    continue
                except pymongo.errors.CollectionInvalid:
                    pass  # created meanwhile (another instance): modify it instead
            await self.db.command("collMod", name, validator=schema.validator(contract), **options)
        return True

    # -- leases, instances and source status (scale-out) --------------------------
    # Expiry times come from the instance's clock: keep clocks in sync (NTP);
    # the lease time is far longer than any sane skew.

    async def ensure_lease_indexes(self) -> None:
        """Forget instances a day after they stopped announcing themselves."""
        self.round_trips += 1
        await self.db[INSTANCES].create_index("expires_at", expireAfterSeconds=86400, name="expire_instances")

    async def acquire_lease(self, source: str, owner: str, ttl: timedelta) -> bool:
        """Take ``source`` for ``owner`` when nobody holds it, its lease expired, or it is ours already."""
        now = now_utc()
        self.round_trips += 1
        try:
            await self.db[LEASES].update_one(
                {"_id": source, "$or": [{"owner": owner}, {"expires_at": {"$lte": now}}]},
                {"$set": {"owner": owner, "expires_at": now + ttl, "acquired_at": now}},
                upsert=True,
            )
        except DuplicateKeyError:
            # The filter missed because another owner holds a live lease; the upsert then collides on _id.
            return False
        return True

    async def renew_leases(self, sources: Iterable[str], owner: str, ttl: timedelta) -> set[str]:
        """Extend every lease of ``sources`` still held by ``owner``; the ones it still holds."""
        names = list(sources)
        if not names:
            return set()
        expires = now_utc() + ttl
        # Owned means owned: an expired lease nobody took is still ours to extend,
        # and one taken over has another owner and is left alone.
        self.round_trips += 2
        await self.db[LEASES].update_many({"_id": {"$in": names}, "owner": owner}, {"$set": {"expires_at": expires}})
        docs = await self.db[LEASES].find({"_id": {"$in": names}, "owner": owner}, {"_id": 1}).to_list(None)
        return {d["_id"] for d in docs}

    async def release_leases(self, sources: Iterable[str], owner: str) -> None:
        """Give up ``owner``'s leases on ``sources`` (another instance may take them at once)."""
        names = list(sources)
        if names:
            self.round_trips += 1
            await self.db[LEASES].delete_many({"_id": {"$in": names}, "owner": owner})

    async def free_sources(self, sources: Iterable[str], owner: str) -> set[str]:
        """Those of ``sources`` no other owner holds a live lease on."""
        names = list(sources)
        if not names:
            return set()
        self.round_trips += 1
        taken = await self.db[LEASES].find(
            {"_id": {"$in": names}, "owner": {"$ne": owner}, "expires_at": {"$gt": now_utc()}}, {"_id": 1}
        ).to_list(None)
        return set(names) - {d["_id"] for d in taken}

    async def heartbeat(self, owner: str, ttl: timedelta, info: Mapping[str, Any]) -> int:
        """Announce ``owner`` alive for ``ttl``; returns how many instances are alive."""
        now = now_utc()
        self.round_trips += 2
        await self.db[INSTANCES].update_one({"_id": owner}, {"$set": {**info, "seen_at": now, "expires_at": now + ttl}}, upsert=True)
        return await self.db[INSTANCES].count_documents({"expires_at": {"$gt": now}})

    async def retire_instance(self, owner: str) -> None:
        self.round_trips += 1
        await self.db[INSTANCES].delete_one({"_id": owner})

    async def save_source_status(self, source: str, fields: Mapping[str, Any]) -> None:
        """Merge ``fields`` into the status document of ``source``."""
        self.round_trips += 1
        await self.db[SOURCE_STATUS].update_one({"_id": source}, {"$set": {**fields, "updated_at": now_utc()}}, upsert=True)

    async def source_overview(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Status documents, leases and instances, for `commsync status`."""
        self.round_trips += 3
        statuses = await self.db[SOURCE_STATUS].find().to_list(None)
        leases = await self.db[LEASES].find().to_list(None)
        instances = await self.db[INSTANCES].find().to_list(None)
        return statuses, leases, instances


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


def _not_captured(dropped: dict[str, int]) -> dict[str, int]:
    # Reported with the batch (the runner's batch_stored event names the source).
    return dropped


def id_variants(text: Any) -> list[Any]:
    """The ids a command-line ``text`` may mean: itself, and the int or ObjectId it spells.

    CRMs key customers by strings, numbers or ObjectIds; a shell argument is always text.
    """
    out: list[Any] = [text]
    if isinstance(text, str):
        if text.isdigit() and len(text) < 19:
            out.append(int(text))
        if bson.ObjectId.is_valid(text) and len(text) == 24:
            out.append(bson.ObjectId(text))
    return out


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


__all__ = ["BatchResult", "Store", "id_variants", "now_utc", "patch_mongomock", "pymongo"]
