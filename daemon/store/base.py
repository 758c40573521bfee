"""The store's connection, collections, indexes, validators and checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pymongo
import pymongo.errors
import structlog

from .. import policy, schema
from ..clock import now_utc
from ..text import cut
from .commands import CommandCounter
from .memory import client as memory_client

log = structlog.get_logger(__name__)

RECORDS = "records"
HISTORY = "customer_history"
SYNC_STATE = "sync_state"
# Deleted record ids capture must not bring back, and digests of forgotten people's addresses.
TOMBSTONES = "tombstones"
SUPPRESSIONS = "suppressions"
# Items that could not be captured, kept for retries and for an admin.
QUARANTINE = "quarantine"
# Items the capture policy left out on purpose, one entry each, for `commsync verify` (verify.py).
EXCLUDED = "excluded"
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


class StoreBase:
    """One MongoDB database: its collections and the calls every part of the store shares."""

    def __init__(
        self,
        client: Any,
        database: str,
        *,
        customers: str = "customers",
        memory: bool = False,
        default_region: str | None = None,
        commands: CommandCounter | None = None,
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
        self.quarantined = self.db[QUARANTINE]
        self.excluded = self.db[EXCLUDED]
        # Commands sent to the server (None on memory://): tests and benchmarks count round trips with it.
        self.commands = commands
        # Within one process recomputations of histories take turns (see REVISIONS for several).
        self._history_lock = asyncio.Lock()
        # Keep everything until configured (app.open_store sets the configured policy).
        self.capture = policy.CapturePolicy(region=default_region)

    @classmethod
    def connect(
        cls,
        uri: str,
        database: str,
        *,
        customers: str = "customers",
        timeout_ms: int = 10_000,
        socket_timeout_ms: int = 300_000,
        default_region: str | None = None,
    ) -> Any:
        """A store on ``uri``; ``memory://`` gives a process-local mongomock store."""
        if uri.startswith("memory://"):
            return cls(memory_client(), database, customers=customers, memory=True, default_region=default_region)
        from motor.motor_asyncio import AsyncIOMotorClient

        counter = CommandCounter()
        client = AsyncIOMotorClient(
            uri,
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            socketTimeoutMS=socket_timeout_ms,
            appname="commsync",
            event_listeners=[counter],
        )
        return cls(client, database, customers=customers, default_region=default_region, commands=counter)

    def close(self) -> None:
        self.client.close()

    async def ping(self, timeout: float | None = None) -> None:
        """Raise unless the server answers (within ``timeout`` seconds, finding the server included)."""
        # The driver's own deadline: a server that is down fails as ServerSelectionTimeoutError
        # naming the cause (connection refused, ...) instead of an anonymous asyncio timeout.
        with pymongo.timeout(timeout):
            await self.db.command("ping")

    async def ensure_indexes(self) -> None:
        """Indexes the daemon and integrators' timeline queries need."""
        await self.records.create_index([("customer_ids", 1), ("occurred_at", -1)], name="customer_time")
        await self.records.create_index([("channel", 1), ("occurred_at", -1)], name="channel_time")
        await self.records.create_index([("thread_id", 1)], name="thread")
        await self.sync_state.create_index([("source", 1)], name="source")
        # Newest-first listing, --text and retention; --participant and re-matching by address.
        await self.records.create_index([("occurred_at", -1)], name="time")
        await self.records.create_index([("participants.address", 1), ("occurred_at", -1)], name="participant_time")
        await self.tombstones.create_index([("occurred_at", 1)], name="occurred")
        await self.quarantined.create_index([("source", 1), ("stream", 1)], name="source_stream")
        # verify: a folder's records by their source entries.
        await self.records.create_index([("sources.source", 1), ("sources.folder", 1), ("sources.uidvalidity", 1)], name="source_folder")
        # verify: a stream's excluded items (under one UIDVALIDITY); a new UIDVALIDITY deletes the older ones.
        await self.excluded.create_index([("source", 1), ("stream", 1), ("uidvalidity", 1)], name="source_stream_uidvalidity")
        # purge: entries of items older than the retention period.
        await self.excluded.create_index([("occurred_at", 1)], name="occurred")

    # -- checkpoints ---------------------------------------------------------

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]:
        """Every saved checkpoint of ``source``, by stream."""
        docs = await self.sync_state.find({"source": source}).to_list(None)
        return {d["stream"]: d["checkpoint"] for d in docs}

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None:
        """Record that everything up to ``checkpoint`` is stored."""
        await self.sync_state.replace_one(
            {"_id": f"{source}/{stream}"},
            {"source": source, "stream": stream, "checkpoint": dict(checkpoint), "updated_at": now_utc()},
            upsert=True,
        )

    async def delete_checkpoint(self, source: str, stream: str) -> None:
        """Forget the checkpoint of a stream that is gone from its source (a deleted or renamed folder)."""
        await self.sync_state.delete_one({"_id": f"{source}/{stream}"})

    # -- validators ------------------------------------------------------------

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
            log.warning("validators_not_installed", reason=cut(str(exc), 200), hint="run `commsync init-db` as a user with dbAdmin")
            return False

    async def install_validators(self) -> bool:
        """Install the storage contract's validators on records and customer_history (level moderate)."""
        if self.memory:
            # mongomock has no collMod and ignores validators; tests check the schema itself.
            return False
        options = {"validationLevel": schema.VALIDATION_LEVEL, "validationAction": schema.VALIDATION_ACTION}
        wanted = {RECORDS: schema.record_schema(), HISTORY: schema.history_schema()}
        existing = set(await self.db.list_collection_names())
        for name, contract in wanted.items():
            if name not in existing:
                try:
                    await self.db.create_collection(name, validator=schema.validator(contract), **options)
                    continue
                except pymongo.errors.CollectionInvalid:
                    pass  # created meanwhile (another instance): modify it instead
            await self.db.command("collMod", name, validator=schema.validator(contract), **options)
        return True
