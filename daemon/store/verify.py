"""What `commsync verify` asks of the database: per stream, which items are stored, excluded, quarantined.

Capture keeps a small ledger of the items the capture policy left out
(`excluded`: automated, blocklisted, tombstoned, suppressed, unmatched, past
retention), one entry per item, so verify tells "left out on purpose" from
"missing" without guessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pymongo import UpdateOne

from .. import capture, policy
from .base import StoreBase, now_utc
from .refusals import sanitized

_CHUNK = 10_000


def excluded_id(source: str | None, stream: str | None, item_id: Any, detail: Mapping[str, Any]) -> str:
    scope = f"{detail['uidvalidity']}:" if detail.get("uidvalidity") is not None else ""
    return f"{source}/{stream}/{scope}{item_id}"


class VerifyMixin(StoreBase):
    """The excluded-items ledger, and the facts verify compares with the remote side."""

    @sanitized
    async def note_excluded(self, source: str | None, stream: str | None, left_out: Mapping[Any, tuple[str, dict[str, Any]]]) -> None:
        """Remember, per item, why capture left it out (one bulk write per batch that left any out)."""
        if not left_out or source is None:
            return
        now = now_utc()
        ops = []
        for rid, (reason, record) in left_out.items():
            # When the contact happened: purge drops the entries of items past retention.
            occurred = record.get("occurred_at")
            for item_id, detail in capture.items_of(record, source, stream):
                doc = {"source": source, "stream": stream, "item_id": item_id, **detail, "record_id": rid, "reason": reason, "at": now}
                if isinstance(occurred, datetime):
                    doc["occurred_at"] = occurred
                ops.append(UpdateOne({"_id": excluded_id(source, stream, item_id, detail)}, {"$set": doc}, upsert=True))
        await self.excluded.bulk_write(ops, ordered=False)

    @sanitized
    async def forget_excluded(self, stale: Mapping[str, Any]) -> int:
        """Delete the entries of items whose ids are void: ``stale`` as `retire_sources` takes it (source, folder, uidvalidity).

        A new UIDVALIDITY renumbers a folder, and a folder gone from the server
        takes its items along: their entries would name other messages, or nothing.
        """
        if "source" not in stale or "folder" not in stale:
            return 0
        query: dict[str, Any] = {"source": stale["source"], "stream": stale["folder"]}
        if "uidvalidity" in stale:
            query["uidvalidity"] = stale["uidvalidity"]
        return (await self.excluded.delete_many(query)).deleted_count

    @sanitized
    async def drop_excluded_before(self, cutoff: datetime) -> int:
        """Delete the entries of items that occurred before ``cutoff`` (retention purge), but those left out *for* retention.

        Those say why an old item still on the server has no record, and
        there is one per such item at most: without it, verify would call it missing.
        """
        query = {"occurred_at": {"$lt": cutoff}, "reason": {"$ne": policy.DROP_RETENTION}}
        return (await self.excluded.delete_many(query)).deleted_count

    async def stored_items(self, source: str, stream: str, scope: Mapping[str, Any], record_ids: Sequence[Any] = ()) -> dict[Any, dict[str, Any]]:
        """Items of ``source``/``stream`` that have a record: item id -> {record_id, gone}.

        IMAP (``scope`` has the UIDVALIDITY): every source entry of that folder
        and UIDVALIDITY. Other kinds: the records ``record_ids`` (their own ids)
        with an entry of this source.
        """
        out: dict[Any, dict[str, Any]] = {}
        if "uidvalidity" in scope:
            entry = {"source": source, "folder": stream, "uidvalidity": scope["uidvalidity"]}
            async for doc in self.records.find({"sources": {"$elemMatch": entry}}, {"sources": 1}):
                for s in doc["sources"]:
                    if all(s.get(k) == v for k, v in entry.items()) and s.get("uid") is not None:
                        gone = "gone_at" in s
                        if s["uid"] not in out or not gone:
                            out[s["uid"]] = {"record_id": doc["_id"], "gone": gone}
            return out
        ids = list(record_ids)
        for start in range(0, len(ids), _CHUNK):
            q = {"_id": {"$in": ids[start : start + _CHUNK]}, "sources.source": source}
            async for doc in self.records.find(q, {"sources": 1}):
                mine = [s for s in doc["sources"] if s.get("source") == source]
                out[doc["_id"]] = {"record_id": doc["_id"], "gone": all("gone_at" in s for s in mine)}
        return out

    async def excluded_items(self, source: str, stream: str, scope: Mapping[str, Any]) -> dict[Any, str]:
        """Items capture left out on purpose: item id -> reason."""
        q: dict[str, Any] = {"source": source, "stream": stream}
        if "uidvalidity" in scope:
            q["uidvalidity"] = scope["uidvalidity"]
        return {d["item_id"]: d["reason"] async for d in self.excluded.find(q, {"item_id": 1, "reason": 1})}

    async def quarantined_items(self, source: str, stream: str) -> set[Any]:
        return {d["item_id"] async for d in self.quarantined.find({"source": source, "stream": stream}, {"item_id": 1})}

    async def tombstoned(self, record_ids: Iterable[Any]) -> set[Any]:
        """Which of ``record_ids`` were deleted for good (`records delete`, `customers forget`)."""
        ids = [r for r in record_ids if r is not None]
        out: set[Any] = set()
        for start in range(0, len(ids), _CHUNK):
            out |= {d["_id"] async for d in self.tombstones.find({"_id": {"$in": ids[start : start + _CHUNK]}}, {"_id": 1})}
        return out

    @sanitized
    async def mark_gone(self, source: str, stream: str, scope: Mapping[str, Any], item_ids: Iterable[Any]) -> int:
        """Mark the source entries of items no longer on the server ``gone_at`` (verify --repair)."""
        ids = list(item_ids)
        if not ids:
            return 0
        if "uidvalidity" in scope:
            stale = {"source": source, "folder": stream, "uidvalidity": scope["uidvalidity"], "uid": {"$in": ids}}
            return await self.retire_sources(stale)
        return await self.retire_sources({"source": source}, record_ids=ids)
