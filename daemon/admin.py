"""Admin operations on a Store: delete, forget, purge, rematch, import customers, export.

Every operation walks its selection in chunks of `CHUNK` records, whatever the
selection's size, and recomputes the histories a chunk touched right after
it, so histories stay true even when a run is interrupted (re-running it
finishes the job). Each works against a live store while the daemon runs.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import structlog

from commsync.connectors.phones import to_e164

from . import policy
from .store import Store, id_variants, now_utc
from .text import json_default

log = structlog.get_logger(__name__)

CHUNK = 1000
# Enough to decide re-matching: the matcher reads participants only.
_MATCH_FIELDS = {"participants": 1, "customer_ids": 1, "channel": 1, "direction": 1}


@dataclass(frozen=True, slots=True)
class Selection:
    records: int
    customers: int


async def count(store: Store, q: Mapping[str, Any]) -> Selection:
    """How many records ``q`` selects, and how many distinct customers they involve."""
    records, customers = await store.count_selection(q)
    return Selection(records, customers)


async def find_customer(store: Store, text: Any) -> tuple[dict[str, Any] | None, list[Any]]:
    """The customer document ``text`` names (or None), and the id values to look for in records."""
    variants = id_variants(text)
    doc = await store.find_customer(variants)
    return doc, ([doc["_id"]] if doc else variants)


def customer_keys(customer: Mapping[str, Any], region: str | None = None) -> set[str]:
    """The comparison keys (lowercased emails, E.164 numbers) of a customer document."""
    keys = set()
    for value in _as_list(customer.get("emails")) + _as_list(customer.get("phones")):
        key = policy.key_of(str(value) if isinstance(value, int) else value, region)
        if key:
            keys.add(key)
    return keys


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


# -- delete and purge ------------------------------------------------------------------


async def delete(store: Store, q: Mapping[str, Any], *, reason: str = "delete") -> Selection:
    """Delete the records ``q`` selects, tombstoned so capture never brings them back."""
    deleted, customers = 0, set()
    while True:
        docs = await store.records_page(q, {"customer_ids": 1, "occurred_at": 1}, CHUNK)
        if not docs:
            break
        n = await store.tombstone_and_delete(docs, reason)
        touched = {cid for d in docs for cid in d.get("customer_ids", ())}
        await store.settle_histories(touched)
        customers |= touched
        deleted += n
        if n == 0:  # they vanished meanwhile (another delete): nothing of ours is left to do
            break
    log.info("records_deleted", records=deleted, customers=len(customers), reason=reason)
    return Selection(deleted, len(customers))


async def purge(store: Store, days: int, *, now: datetime | None = None, dry_run: bool = False) -> Selection:
    """Delete records that occurred more than ``days`` ago; recompute the histories they touched.

    No tombstones: capture itself refuses records older than the retention
    period, and tombstones older than it are dropped here too.
    """
    cutoff = (now or now_utc()) - timedelta(days=days)
    q = {"occurred_at": {"$lt": cutoff}}
    if dry_run:
        return await count(store, q)
    deleted, customers = 0, set()
    while True:
        docs = await store.records_page(q, {"customer_ids": 1}, CHUNK)
        if not docs:
            break
        n = await store.delete_records([d["_id"] for d in docs])
        touched = {cid for d in docs for cid in d.get("customer_ids", ())}
        await store.settle_histories(touched)
        customers |= touched
        deleted += n
        if n == 0:
            break
    await store.drop_tombstones_before(cutoff)
    await store.drop_excluded_before(cutoff)
    log.info("records_purged", records=deleted, customers=len(customers), days=days)
    return Selection(deleted, len(customers))


# -- forget ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ForgetReport:
    customer: Any
    found: bool = False
    suppressed: int = 0
    deleted: int = 0
    unlinked: int = 0
    history_deleted: bool = False
    customer_deleted: bool = False
    others: set[Any] = field(default_factory=set)


async def forget(store: Store, customer_text: Any, *, keep_orphans: bool = False, extra: Iterable[str] = ()) -> ForgetReport:
    """Remove a customer from every record and suppress their addresses and numbers.

    Records that then belong to no customer are deleted (tombstoned) unless
    ``keep_orphans``; every record kept loses the customer's addresses from
    its participants. ``extra`` adds addresses or numbers the customer
    document does not list.
    """
    region = store.default_region
    customer, ids = await find_customer(store, customer_text)
    report = ForgetReport(customer=ids[0], found=customer is not None)
    report.history_deleted = await store.history_of(ids) is not None
    keys = customer_keys(customer or {}, region) | {k for e in extra if (k := policy.key_of(e, region))}
    # Suppress first: capture running meanwhile cannot bring the person back.
    report.suppressed = await store.suppress((policy.suppression_key(k) for k in keys), "forget")
    addresses = sorted(keys)
    clauses: list[dict[str, Any]] = [{"customer_ids": {"$in": ids}}]
    if addresses:
        clauses.append({"participants.address": {"$in": addresses}})
    q = {"$or": clauses}
    pull: dict[str, Any] = {"customer_ids": {"$in": ids}}
    if addresses:
        pull["participants"] = {"address": {"$in": addresses}}
    while True:
        docs = await store.records_page(q, {"customer_ids": 1, "occurred_at": 1}, CHUNK)
        if not docs:
            break
        orphans = [] if keep_orphans else [d for d in docs if not set(d.get("customer_ids", ())) - set(ids)]
        orphan_ids = {d["_id"] for d in orphans}
        kept = [d["_id"] for d in docs if d["_id"] not in orphan_ids]
        deleted = await store.tombstone_and_delete(orphans, "forget")
        changed = await store.pull_from_records(kept, pull)
        touched = {cid for d in docs for cid in d.get("customer_ids", ())}
        await store.settle_histories(touched)
        report.others |= touched - set(ids)
        report.deleted += deleted
        report.unlinked += changed
        if deleted + changed == 0:  # nothing matched what we remove: stop rather than spin
            break
    # Normally gone already (a customer left with no records has no history); make sure.
    await store.delete_histories(ids)
    if customer is not None and customer.get("created_by") == policy.AUTO_CREATED_BY:
        # commsync made this document (auto_create or import): it goes too. The CRM's own stay the CRM's.
        report.customer_deleted = await store.delete_customer(customer["_id"])
    log.info("customer_forgotten", deleted=report.deleted, unlinked=report.unlinked, suppressed=report.suppressed)
    return report


# -- rematch ------------------------------------------------------------------------------------


@dataclass(slots=True)
class RematchReport:
    examined: int = 0
    relinked: int = 0
    customers: set[Any] = field(default_factory=set)


async def _relink(store: Store, docs: Sequence[Mapping[str, Any]], report: RematchReport) -> None:
    new = await store.match(docs)
    changes = {d["_id"]: cids for d, cids in zip(docs, new, strict=True) if list(d.get("customer_ids", ())) != cids}
    await store.set_customer_ids(changes)
    touched = {cid for d in docs if d["_id"] in changes for cid in (*d.get("customer_ids", ()), *changes[d["_id"]])}
    await store.settle_histories(touched)
    report.examined += len(docs)
    report.relinked += len(changes)
    report.customers |= touched


async def _rematch_where(store: Store, q: Mapping[str, Any], report: RematchReport) -> None:
    # Pages by _id (record ids are strings): re-linking changes the very fields
    # the query may select on, so a plain cursor could skip or repeat records.
    last = None
    while True:
        docs = await store.records_after(q, _MATCH_FIELDS, CHUNK, last)
        if not docs:
            return
        await _relink(store, docs, report)
        last = docs[-1]["_id"]


def _involving(ids: Sequence[Any], keys: Iterable[str]) -> dict[str, Any]:
    clauses: list[dict[str, Any]] = [{"customer_ids": {"$in": list(ids)}}] if ids else []
    keys = sorted(keys)
    if keys:
        clauses.append({"participants.address": {"$in": keys}})
    return {"$or": clauses} if clauses else {"_id": {"$in": []}}


async def rematch(store: Store, customer_text: Any = None) -> RematchReport:
    """Re-link stored records to customers as they are now; all records, or those of one customer.

    With a customer: the records linked to it (it may have lost an address)
    and those naming one of its addresses or numbers (it may have gained one).
    """
    report = RematchReport()
    if customer_text is None:
        await _rematch_where(store, {}, report)
    else:
        customer, ids = await find_customer(store, customer_text)
        await _rematch_where(store, _involving(ids, customer_keys(customer or {}, store.default_region)), report)
    log.info("rematched", examined=report.examined, relinked=report.relinked, customers=len(report.customers))
    return report


async def rematch_unmatched(store: Store, *, customers_per_query: int = 500) -> RematchReport:
    """Link records captured while they matched no customer to the customers that hold their addresses now.

    Driven by the customers (an index lookup per chunk of their addresses), so
    its cost follows the number of customers, not of unmatched records.
    """
    report = RematchReport()
    chunk: list[Mapping[str, Any]] = []
    # One cursor over the customers: their _ids may mix types, which paging by _id would skip.
    async for customer in store.all_customers():
        chunk.append(customer)
        if len(chunk) >= customers_per_query:
            await _rematch_unmatched_of(store, chunk, report)
            chunk = []
    await _rematch_unmatched_of(store, chunk, report)
    if report.relinked:
        log.info("rematched_unmatched", examined=report.examined, relinked=report.relinked, customers=len(report.customers))
    return report


async def _rematch_unmatched_of(store: Store, customers: Sequence[Mapping[str, Any]], report: RematchReport) -> None:
    keys = sorted({k for c in customers for k in customer_keys(c, store.default_region)})
    if keys:
        await _rematch_where(store, {"customer_ids": [], "participants.address": {"$in": keys}}, report)


# -- customers import -------------------------------------------------------------------------

_SEPARATORS = re.compile(r"[;,|]")


@dataclass(slots=True)
class ImportReport:
    inserted: int = 0
    updated: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    rematch: RematchReport = field(default_factory=RematchReport)


def read_customers(
    path: Path, fmt: str | None = None, region: str | None = None
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line, customer document, None) or (line, None, reason) for each row of a CSV or JSON lines file.

    CSV needs a header with ``id`` (or ``_id``) and any of ``name``, ``emails``,
    ``phones``; several emails or phones in one cell are separated by ``;``,
    ``,``, ``|`` or spaces. JSON lines: one object per line with the same
    keys, emails and phones as lists or strings. Phone numbers are stored in
    E.164 when they read (``region`` for national forms), else as written.
    """
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if fmt == "csv":
            reader = csv.DictReader(handle)
            for row in reader:
                yield (reader.line_num, *_customer_doc({(k or "").strip().lower(): v for k, v in row.items()}, region))
        else:
            for n, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    yield n, None, f"not JSON: {exc.msg}"
                    continue
                if not isinstance(row, dict):
                    yield n, None, "not a JSON object"
                    continue
                yield (n, *_customer_doc(row, region))


def _customer_doc(row: Mapping[str, Any], region: str | None) -> tuple[dict[str, Any] | None, str | None]:
    cid = row.get("id", row.get("_id"))
    if isinstance(cid, str):
        cid = cid.strip()
    if cid is None or cid == "" or isinstance(cid, bool | float | list | dict):
        return None, "no id"
    emails = []
    for value in _values(row.get("emails", row.get("email"))):
        address = value.strip().lower()
        local, at, domain = address.rpartition("@")
        if not (at and local and "." in domain):
            return None, f"{value!r} is not an email address"
        emails.append(address)
    phones = []
    for value in _values(row.get("phones", row.get("phone"))):
        number = to_e164(value, region)
        if number is None and not any(c.isdigit() for c in value):
            return None, f"{value!r} is not a phone number"
        phones.append(number or value.strip())
    name = row.get("name")
    doc: dict[str, Any] = {"_id": cid, "name": name.strip() if isinstance(name, str) and name.strip() else None}
    doc["emails"] = list(dict.fromkeys(emails))
    doc["phones"] = list(dict.fromkeys(phones))
    return doc, None


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value if str(v).strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    if not isinstance(value, str):
        return [str(value)]
    # Phone numbers hold spaces, so a cell splits on ; , | and only addresses also on spaces.
    if _SEPARATORS.search(value):
        parts = _SEPARATORS.split(value)
    else:
        parts = value.split() if "@" in value else [value]
    return [p.strip() for p in parts if p.strip()]


async def import_customers(store: Store, rows: Iterable[tuple[int, dict[str, Any] | None, str | None]]) -> ImportReport:
    """Upsert customers, then re-link the records that involve them."""
    report = ImportReport()
    chunk: list[dict[str, Any]] = []

    async def flush() -> None:
        if not chunk:
            return
        inserted, updated = await store.upsert_customers(chunk, origin="import")
        report.inserted += inserted
        report.updated += updated
        keys = {k for doc in chunk for k in customer_keys(doc, store.default_region)}
        await _rematch_where(store, _involving([d["_id"] for d in chunk], keys), report.rematch)
        chunk.clear()

    for line, doc, reason in rows:
        if doc is None:
            report.rejected.append((line, reason or "invalid"))
            continue
        chunk.append(doc)
        if len(chunk) >= CHUNK:
            await flush()
    await flush()
    log.info("customers_imported", inserted=report.inserted, updated=report.updated, rejected=len(report.rejected))
    return report


# -- export ---------------------------------------------------------------------------------------

CSV_FIELDS = (
    "id",
    "occurred_at",
    "channel",
    "direction",
    "customer_ids",
    "from",
    "to",
    "cc",
    "subject",
    "content",
    "thread_id",
    "attachments",
    "automated",
    "sources",
    "ingested_at",
)


def json_line(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, default=json_default, ensure_ascii=False)


def csv_row(doc: Mapping[str, Any]) -> list[str]:
    """One record as the CSV_FIELDS columns; lists are joined with "; "."""

    def text(value: Any) -> str:
        if value is None:
            return ""
        return value.isoformat() if isinstance(value, datetime) else str(value)

    def role(*roles: str) -> str:
        return "; ".join(p.get("address") or "" for p in doc.get("participants", ()) if p.get("role") in roles)

    sources = "; ".join(
        "/".join(str(s.get(k)) for k in ("kind", "source", "folder", "uid") if s.get(k) is not None) for s in doc.get("sources", ())
    )
    return [
        text(doc.get("_id")),
        text(doc.get("occurred_at")),
        text(doc.get("channel")),
        text(doc.get("direction")),
        "; ".join(text(c) for c in doc.get("customer_ids", ())),
        role("from", "sender"),
        role("to"),
        role("cc", "bcc"),
        text(doc.get("subject")),
        text(doc.get("content")),
        text(doc.get("thread_id")),
        "; ".join(text(a.get("filename")) for a in doc.get("attachments", ()) if isinstance(a, Mapping)),
        "true" if doc.get("automated") else "false",
        sources,
        text(doc.get("ingested_at")),
    ]


async def export(docs: AsyncIterable[Mapping[str, Any]], out: TextIO, fmt: str) -> int:
    """Write ``docs`` to ``out`` as JSON lines or CSV, one record at a time; how many were written.

    Nothing is collected: each record is formatted and written as it arrives
    from the cursor, so memory stays flat however many records there are.
    """
    n = 0
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)

        def emit(row: Sequence[str]) -> None:
            writer.writerow(row)
            out.write(buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()

        emit(CSV_FIELDS)
        async for doc in docs:
            emit(csv_row(doc))
            n += 1
    else:
        async for doc in docs:
            out.write(json_line(doc) + "\n")
            n += 1
    out.flush()
    return n


async def cursor(store: Store, q: Mapping[str, Any], *, sort: Sequence[tuple[str, int]], limit: int | None = None) -> AsyncIterator[dict[str, Any]]:
    """The records ``q`` selects, in ``sort`` order, streamed from the server in batches."""
    async for doc in store.cursor(q, sort=sort, limit=limit):
        yield doc
