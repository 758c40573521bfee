"""Retrying what is in quarantine: each due item read again through the normal path.

The store keeps the entries (daemon/store/quarantine.py) and their schedule;
this module reads the due items again with the connector's `refetch` and
writes them as any batch is written. An item that reads and stores now
leaves quarantine; one that fails again stays, one attempt further on (after
`MAX_ATTEMPTS` it waits for an admin); one the remote side no longer has is
let go. A stream that cannot be read at all (its folder deleted, the server
down) costs its items an attempt the same way, and says so in their entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from commsync.connectors.base import Connector, Refetches, StreamMissing

from .text import describe

log = structlog.get_logger(__name__)


@dataclass
class RetryReport:
    stored: list[Any] = field(default_factory=list)
    failed: list[Any] = field(default_factory=list)
    gone: list[Any] = field(default_factory=list)
    # Streams whose retry failed as a whole: stream -> the error, described (never content).
    errors: dict[str, str] = field(default_factory=dict)


async def retry(store: Any, sink: Any, connector: Connector, entries: Sequence[Mapping[str, Any]]) -> RetryReport:
    """Read ``entries`` (quarantine documents of this connector's source) again and store what reads.

    A stream whose refetch fails (its folder deleted, the server down, a 5xx)
    costs that stream's items one attempt (``store.quarantine_attempt_failed``)
    and the other streams go on: a retry that always fails ends with the admin,
    never retries after every pass forever.
    """
    report = RetryReport()
    if not isinstance(connector, Refetches):
        return report
    state = await store.load_state(connector.name)
    by_stream: dict[str, list[tuple[Any, Mapping[str, Any]]]] = {}
    for entry in entries:
        if entry.get("item_id") is not None:
            by_stream.setdefault(entry["stream"], []).append((entry["item_id"], entry.get("detail") or {}))
    for stream, items in by_stream.items():
        seen: set[Any] = set()
        try:
            await _retry_stream(store, sink, connector, stream, state.get(stream), items, report, seen)
        except Exception as exc:
            await _stream_failed(store, connector.name, stream, [i for i, _ in items if i not in seen], exc, report)
            continue
        gone = [item_id for item_id, _ in items if item_id not in seen]
        if gone:
            await store.quarantine_clear(connector.name, stream, gone)
            report.gone += gone
            log.info("quarantine_items_gone", source=connector.name, stream=stream, items=gone[:20], count=len(gone))
    if report.stored or report.failed:
        log.info("quarantine_retried", source=connector.name, stored=len(report.stored), failed=len(report.failed), gone=len(report.gone))
    return report


async def _retry_stream(
    store: Any, sink: Any, connector: Any, stream: str, checkpoint: Any, items: list[tuple[Any, Mapping[str, Any]]], report: RetryReport, seen: set[Any]
) -> None:
    async for batch in connector.refetch(stream, checkpoint, items):
        result = await sink.write(connector.name, batch)
        refused = set(getattr(result, "refused", ()))
        # The write re-quarantined what failed again (one attempt further on); the rest is done.
        stored = [item for record, item in zip(batch.records, batch.item_ids, strict=True) if record["_id"] not in refused]
        await store.quarantine_clear(connector.name, stream, stored)
        report.stored += stored
        report.failed += [m.item_id for m in batch.malformed] + [i for i in batch.item_ids if i not in stored]
        seen.update(batch.item_ids, (m.item_id for m in batch.malformed))


async def _stream_failed(store: Any, source: str, stream: str, left: list[Any], exc: Exception, report: RetryReport) -> None:
    """Count the attempt of the items the failure left unread; say so when the stream is gone."""
    error = describe(exc)
    gone = isinstance(exc, StreamMissing)
    report.errors[stream] = error
    report.failed += left
    log.warning("quarantine_retry_failed", source=source, stream=stream, items=len(left), stream_gone=gone, error=error)
    await store.quarantine_attempt_failed(source, stream, left, error, stream_gone=gone)


async def retry_due(store: Any, sink: Any, connector: Connector) -> RetryReport:
    """Retry this source's entries whose automatic retry is due."""
    due = await store.quarantine_due(connector.name)
    return await retry(store, sink, connector, due) if due else RetryReport()
