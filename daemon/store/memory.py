"""``memory://``: a process-local store on the mongomock double (the demo, fast tests).

mongomock is not a server: no collMod, validators ignored, no change streams,
no transactions, O(n) upserts. Where it and a server disagree, the server is
right; the tests run the store on both.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

_PATCHED = False


def client() -> Any:
    """A fresh in-process client (each client holds its own data)."""
    from mongomock_motor import AsyncMongoMockClient

    patch_mongomock()
    return AsyncMongoMockClient(tz_aware=True)


def patch_mongomock() -> None:
    """Let mongomock 4.3's bulk builder accept the keywords pymongo >= 4.11 passes.

    pymongo's UpdateOne/ReplaceOne hand ``sort=`` to the bulk builder;
    mongomock's builder predates it and raises TypeError. Dropping a ``None``
    sort changes nothing; a real one is refused loudly. The double bends here,
    never the product: every batch stays one bulk write.
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


async def retire_sources(records: Any, query: Mapping[str, Any], stale: Mapping[str, Any], now: datetime) -> int:
    """What ``update_many`` with ``array_filters`` does on a server (mongomock has no array filters).

    One read and one bulk write however many records: the double bends, the
    batch stays one write.
    """
    from pymongo import UpdateOne

    docs = await records.find(dict(query), {"sources": 1}).to_list(None)
    ops = []
    for doc in docs:
        sources = [
            {**s, "gone_at": now} if "gone_at" not in s and all(_matches(s.get(k), v) for k, v in stale.items()) else s for s in doc["sources"]
        ]
        ops.append(UpdateOne({"_id": doc["_id"]}, {"$set": {"sources": sources}}))
    if ops:
        await records.bulk_write(ops, ordered=False)
    return len(ops)


def _matches(value: Any, condition: Any) -> bool:
    if isinstance(condition, Mapping) and set(condition) == {"$ne"}:
        return value != condition["$ne"]
    if isinstance(condition, Mapping) and set(condition) == {"$in"}:
        return value in condition["$in"]
    return value == condition
