"""Scale-out in MongoDB: source leases, live instances, and each source's status.

Expiry times come from the instance's clock: keep clocks in sync (NTP); the
lease time is far longer than any sane skew.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import DuplicateKeyError

from ..clock import aware
from .base import INSTANCES, LEASES, SOURCE_STATUS, StoreBase, now_utc

# A lease without a readable expiry counts as expired long ago.
_NEVER = datetime.min.replace(tzinfo=UTC)


class CoordinationMixin(StoreBase):
    """Leases, instances and source status documents."""

    async def ensure_lease_indexes(self) -> None:
        """Forget instances a day after they stopped announcing themselves."""
        await self.db[INSTANCES].create_index("expires_at", expireAfterSeconds=86400, name="expire_instances")

    async def acquire_lease(self, source: str, owner: str, ttl: timedelta, *, predecessor: str | None = None) -> bool:
        """Take ``source`` for ``owner`` when nobody holds it, its lease expired, or it is ours (or ``predecessor``'s) already."""
        now = now_utc()
        mine = [{"owner": owner}] + ([{"owner": predecessor}] if predecessor else [])
        try:
            await self.db[LEASES].update_one(
                {"_id": source, "$or": [*mine, {"expires_at": {"$lte": now}}]},
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
        await self.db[LEASES].update_many({"_id": {"$in": names}, "owner": owner}, {"$set": {"expires_at": expires}})
        docs = await self.db[LEASES].find({"_id": {"$in": names}, "owner": owner}, {"_id": 1}).to_list(None)
        return {d["_id"] for d in docs}

    async def release_leases(self, sources: Iterable[str], owner: str) -> None:
        """Give up ``owner``'s leases on ``sources`` (another instance may take them at once)."""
        names = list(sources)
        if names:
            await self.db[LEASES].delete_many({"_id": {"$in": names}, "owner": owner})

    async def lease_owners(self, sources: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The lease document of each of ``sources`` that has one, with ``live`` saying whether it is unexpired."""
        names = list(sources)
        if not names:
            return {}
        now = now_utc()
        docs = await self.db[LEASES].find({"_id": {"$in": names}}, {"owner": 1, "expires_at": 1}).to_list(None)
        return {d["_id"]: {**d, "live": (aware(d.get("expires_at")) or _NEVER) > now} for d in docs}

    async def heartbeat(self, owner: str, ttl: timedelta, info: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Announce ``owner`` alive for ``ttl``; the live instances, with the sources each can work."""
        now = now_utc()
        await self.db[INSTANCES].update_one({"_id": owner}, {"$set": {**info, "seen_at": now, "expires_at": now + ttl}}, upsert=True)
        return await self.db[INSTANCES].find({"expires_at": {"$gt": now}}, {"sources_configured": 1, "seen_at": 1}).to_list(None)

    async def retire_instance(self, owner: str) -> None:
        await self.db[INSTANCES].delete_one({"_id": owner})

    async def save_source_status(self, source: str, fields: Mapping[str, Any]) -> None:
        """Merge ``fields`` into the status document of ``source``."""
        await self.db[SOURCE_STATUS].update_one({"_id": source}, {"$set": {**fields, "updated_at": now_utc()}}, upsert=True)

    async def save_source_error(self, source: str, error: str, at: datetime) -> None:
        """Record ``error`` as the source's last error unless a newer one is there already."""
        try:
            await self.db[SOURCE_STATUS].update_one(
                {"_id": source, "$or": [{"last_error_at": {"$lt": at}}, {"last_error_at": None}]},
                {"$set": {"last_error": error, "last_error_at": at}},
                upsert=True,
            )
        except DuplicateKeyError:
            pass  # a newer error is recorded: the upsert of ours collided with it

    async def source_status(self, source: str) -> dict[str, Any] | None:
        """The status document of ``source``, if it has one."""
        return await self.db[SOURCE_STATUS].find_one({"_id": source})

    async def request_resume(self, source: str) -> bool:
        """Ask whoever works ``source`` to leave the parked state (`commsync source resume`); False when unknown."""
        result = await self.db[SOURCE_STATUS].update_one({"_id": source}, {"$set": {"resume_requested_at": now_utc()}})
        return result.matched_count == 1

    async def source_overview(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Status documents, leases and instances, for `commsync status`."""
        statuses = await self.db[SOURCE_STATUS].find().to_list(None)
        leases = await self.db[LEASES].find().to_list(None)
        instances = await self.db[INSTANCES].find().to_list(None)
        return statuses, leases, instances
