"""`commsync verify`: prove that what was captured is complete, against the remote side.

For each source and stream (an IMAP folder, a Twilio list) within the range
already synced (IMAP: UIDs up to the checkpoint's last UID under its
UIDVALIDITY; Twilio: the SIDs from ``since`` to the cursor), every item the
remote side holds is one of:

* stored: its record is in the store, with a live source entry for this stream;
* excluded on purpose: the connector never makes it a record (a call that
  never started, a leg in its parent's record), the capture policy left it
  out (the `excluded` ledger: automated, blocklisted, unmatched, past
  retention, suppressed), or it was deleted for good (a tombstone);
* quarantined: it could not be read or stored, and waits in quarantine;
* missing: none of those. That is what verify exists to find.

Records whose items are no longer on the server are counted apart ("gone"):
neither missing nor stored. ``--repair`` fetches exactly the missing items
through the normal path (normalize, match, store, history), marks the gone
ones, and verifies again.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import structlog

from commsync.connectors.base import Connector, Inventories, Refetches, RemoteItem, SourceError

from . import app
from .sinks import StoreSink
from .store import now_utc
from .text import describe, field_key, json_default

log = structlog.get_logger(__name__)

# Missing items named in the report, per stream (the JSON lists them all).
NAMED = 5


@dataclass
class StreamReport:
    """What verify found in one stream."""

    source: str
    stream: str
    remote: int = 0
    stored: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    missing: list[str] = field(default_factory=list)
    missing_ids: list[Any] = field(default_factory=list)
    gone: int = 0
    gone_ids: list[Any] = field(default_factory=list)
    repaired: int = 0
    error: str | None = None
    at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.missing and not self.quarantined

    def counts(self) -> dict[str, Any]:
        """What `source_status` and the metrics keep of a run."""
        return {
            "at": self.at,
            "remote": self.remote,
            "stored": self.stored,
            "excluded": sum(self.excluded.values()),
            "quarantined": self.quarantined,
            "missing": len(self.missing_ids),
            "gone": self.gone,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Facts:
    """What the store knows of a stream's items."""

    stored: Mapping[Any, Mapping[str, Any]]  # item id -> {record_id, gone}
    excluded: Mapping[Any, str]  # item id -> reason
    quarantined: frozenset[Any]
    tombstoned: frozenset[Any]  # record ids


def compare(source: str, stream: str, remote: Sequence[RemoteItem], facts: Facts) -> StreamReport:
    """Sort every remote item into stored, excluded, quarantined or missing; count the gone. Pure."""
    report = StreamReport(source, stream, remote=len(remote))
    excluded: Counter[str] = Counter()
    here = set()
    for item in remote:
        here.add(item.item_id)
        live = facts.stored.get(item.item_id)
        if live is not None and not live["gone"]:
            report.stored += 1
        elif item.excluded:
            excluded[_reason(item.excluded)] += 1
        elif item.item_id in facts.excluded:
            excluded[facts.excluded[item.item_id]] += 1
        elif item.record_id is not None and item.record_id in facts.tombstoned:
            excluded["deleted"] += 1
        elif item.item_id in facts.quarantined:
            report.quarantined += 1
        else:
            report.missing_ids.append(item.item_id)
            report.missing.append(item.label or str(item.item_id))
    report.excluded = dict(excluded)
    report.gone_ids = sorted((i for i, f in facts.stored.items() if i not in here and not f["gone"]), key=str)
    report.gone = len(report.gone_ids) + sum(1 for i, f in facts.stored.items() if f["gone"] and i not in here)
    # Quarantined items the remote side no longer lists still wait for an admin.
    report.quarantined += len(facts.quarantined - here)
    return report


def _reason(text: str) -> str:
    # "a leg of CA...: in that call's record" counts as one reason, whatever the parent.
    return text.split(":")[0] if text.startswith("a leg of ") else text


async def verify_source(connector: Connector, store: Any, *, repair: bool = False) -> list[StreamReport]:
    """Verify every stream of one source (and repair what is missing when asked); one report per stream."""
    if not isinstance(connector, Inventories):
        return [StreamReport(connector.name, "*", error=f"{connector.kind} sources cannot be verified")]
    state = await store.load_state(connector.name)
    reports = []
    for stream, checkpoint in sorted(state.items()):
        try:
            report = await _verify_and_repair(connector, store, stream, checkpoint, repair)
        except Exception as exc:
            # A fetch error, a timeout, the store: this stream's report says so, the others still count.
            report = StreamReport(connector.name, stream, error=describe(exc), at=now_utc())
        reports.append(report)
        log.info("stream_verified", source=connector.name, stream=stream, ok=report.ok, **_loggable(report))
    return reports


async def _verify_and_repair(connector: Any, store: Any, stream: str, checkpoint: Mapping[str, Any], repair: bool) -> StreamReport:
    report = await _verify_stream(connector, store, stream, checkpoint)
    if repair and report.error is None and (report.missing_ids or report.gone_ids):
        report.repaired = await _repair(connector, store, stream, checkpoint, report)
        again = await _verify_stream(connector, store, stream, checkpoint)
        again.repaired = report.repaired
        report = again
    return report


async def _verify_stream(connector: Any, store: Any, stream: str, checkpoint: Mapping[str, Any]) -> StreamReport:
    scope = {"uidvalidity": checkpoint["uidvalidity"]} if "uidvalidity" in checkpoint else {}
    try:
        remote = await connector.inventory(stream, checkpoint)
    except SourceError as exc:
        return StreamReport(connector.name, stream, error=describe(exc), at=now_utc())
    record_ids = [i.record_id for i in remote if i.record_id is not None]
    # Four independent reads: one round trip's wait, not four.
    stored, excluded, quarantined, tombstoned = await asyncio.gather(
        store.stored_items(connector.name, stream, scope, record_ids),
        store.excluded_items(connector.name, stream, scope),
        store.quarantined_items(connector.name, stream),
        store.tombstoned(record_ids),
    )
    facts = Facts(stored=stored, excluded=excluded, quarantined=frozenset(quarantined), tombstoned=frozenset(tombstoned))
    report = compare(connector.name, stream, remote, facts)
    report.at = now_utc()
    return report


async def _repair(connector: Any, store: Any, stream: str, checkpoint: Mapping[str, Any], report: StreamReport) -> int:
    """Fetch exactly the missing items through the normal path; mark the gone ones. Returns items stored."""
    scope = {"uidvalidity": checkpoint["uidvalidity"]} if "uidvalidity" in checkpoint else {}
    if report.gone_ids:
        await store.mark_gone(connector.name, stream, scope, report.gone_ids)
    if not report.missing_ids or not isinstance(connector, Refetches):
        return 0
    sink = StoreSink(store)
    stored = 0
    touched: set[Any] = set()
    async for batch in connector.refetch(stream, checkpoint, [(i, scope) for i in report.missing_ids]):
        # The normal path, without a checkpoint: the stream's position does not move.
        result = await sink.write(connector.name, batch)
        stored += result.records
        touched.update(result.touched)
    # The records went behind commsync's back, so their customers' histories still counted them: recount.
    await store.refresh_history(touched)
    log.info("stream_repaired", source=connector.name, stream=stream, fetched=len(report.missing_ids), stored=stored)
    return stored


def _loggable(report: StreamReport) -> dict[str, Any]:
    counts = report.counts()
    counts.pop("at")
    return {k: v for k, v in counts.items() if v} | ({"first_missing": report.missing[:NAMED]} if report.missing else {})


def render(report: StreamReport) -> str:
    """One line per stream for a human."""
    head = f"{'ok  ' if report.ok else 'FAIL'}  {report.source} {report.stream}"
    if report.error:
        return f"{head}: {report.error}"
    parts = [f"{report.stored} stored"]
    if report.excluded:
        parts.append(f"{sum(report.excluded.values())} excluded on purpose (" + ", ".join(f"{r}: {n}" for r, n in sorted(report.excluded.items())) + ")")
    parts += [f"{report.quarantined} quarantined", f"{len(report.missing)} missing"]
    if report.gone:
        parts.append(f"{report.gone} no longer on the server")
    if report.repaired:
        parts.append(f"{report.repaired} repaired")
    line = f"{head}: " + ", ".join(parts)
    if report.missing:
        more = len(report.missing) - NAMED
        line += "\n      missing: " + "; ".join(report.missing[:NAMED]) + (f"; and {more} more" if more > 0 else "")
    return line


def as_json(report: StreamReport) -> str:
    doc = asdict(report)
    doc["ok"] = report.ok
    return json.dumps(doc, default=json_default, ensure_ascii=False)


# -- the command -----------------------------------------------------------------------------


def register(sub: Any, with_config: Any) -> None:
    """`commsync verify` on the CLI's subparsers."""
    p = with_config(sub.add_parser("verify", help="prove capture is complete: compare each folder and Twilio list with the store"))
    p.add_argument("--source", help="only this source")
    p.add_argument("--repair", action="store_true", help="fetch exactly the missing items through the normal path, then verify again")
    p.add_argument("--json", action="store_true", help="one JSON object per stream")
    p.set_defaults(handler=command)


async def command(settings: Any, args: Any) -> int:
    """0 when nothing is missing or quarantined, 1 otherwise, 2 for an unknown source."""
    names = [s.name for s in settings.sources()]
    if args.source and args.source not in names:
        print(f"commsync: no source {args.source!r} in the config (it has: {', '.join(names) or 'none'})", file=sys.stderr)
        return 2
    store = app.open_store(settings)
    ok = True
    with app.parse_pool(settings) as pool:
        try:
            for connector in app.build_connectors(settings, pool):
                if args.source and connector.name != args.source:
                    continue
                try:
                    reports = await verify_source(connector, store, repair=args.repair)
                except Exception as exc:
                    reports = [StreamReport(connector.name, "*", error=describe(exc))]
                finally:
                    await connector.aclose()
                await save(store, connector.name, reports)
                for report in reports:
                    print(as_json(report) if args.json else render(report), flush=True)
                    ok &= report.ok
        finally:
            store.close()
    return 0 if ok else 1


async def save(store: Any, source: str, reports: Iterable[StreamReport]) -> None:
    """Keep each stream's result in the source's status document (`commsync status`, /metrics)."""
    fields: dict[str, Any] = {f"verified.{field_key(r.stream)}": r.counts() for r in reports if r.stream != "*"}
    fields["verified_at"] = now_utc()
    # A run with a stream that failed is tried again sooner (daemon/upkeep.py), also after a restart.
    fields["verify_failed"] = any(r.error is not None for r in reports)
    await store.save_source_status(source, fields)
