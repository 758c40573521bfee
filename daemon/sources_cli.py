"""`commsync quarantine list|retry|drop` and `commsync source resume`: what an admin does about a source."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from commsync.connectors import registry

from . import quarantine
from .admin_cli import Console, _command
from .clock import aware
from .sinks import StoreSink
from .status import ago
from .store import Store
from .text import cut, json_default


def register(sub: Any, with_config: Any) -> None:
    """The commands, on the CLI's subparsers."""
    q = sub.add_parser("quarantine", help="items that could not be captured: list, retry, drop")
    qsub = q.add_subparsers(dest="quarantine_command", required=True)
    ls = with_config(qsub.add_parser("list", help="every item in quarantine, oldest first"))
    ls.add_argument("--source", help="only this source")
    ls.add_argument("--json", action="store_true", help="one JSON object per item")
    _command(ls, quarantine_list)
    rt = with_config(qsub.add_parser("retry", help="read an item again now, through the normal path"))
    rt.add_argument("id", nargs="?", help="the item's ID (from `quarantine list`)")
    rt.add_argument("--all", action="store_true", help="every item (of --source)")
    rt.add_argument("--source", help="with --all: only this source")
    _command(rt, quarantine_retry)
    dr = with_config(qsub.add_parser("drop", help="let an item go for good (verify then counts it as missing)"))
    dr.add_argument("id")
    _command(dr, quarantine_drop)

    s = sub.add_parser("source", help="a configured source")
    ssub = s.add_subparsers(dest="source_command", required=True)
    resume = with_config(ssub.add_parser("resume", help="log in again to a source parked after its credentials were refused"))
    resume.add_argument("name")
    _command(resume, source_resume)


async def quarantine_list(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    entries = await store.quarantine_list(args.source)
    now = datetime.now(UTC)
    if args.json:
        for e in entries:
            io.print(json.dumps(e, default=json_default, ensure_ascii=False))
        return 0
    if not entries:
        io.print("quarantine is empty")
        return 0
    rows = [("ID", "ATTEMPTS", "FIRST", "NEXT", "REASON")]
    for e in entries:
        due_at = e.get("next_attempt_at")
        nxt = aware(due_at) or now
        rows.append(
            (
                str(e["_id"]),
                str(e.get("attempts", 0)),
                ago(aware(e.get("first_attempt_at")) or now, now),
                "admin" if due_at is None else ("due" if nxt <= now else f"in {ago(now, nxt).removesuffix(' ago')}"),
                cut(e.get("reason") or "", 80),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        io.print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def quarantine_retry(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    if args.all:
        entries = await store.quarantine_list(args.source)
    elif args.id:
        entry = await store.quarantine_get(args.id)
        if entry is None:
            io.error(f"no quarantine item {args.id!r} (see `commsync quarantine list`)")
            return 2
        entries = [entry]
    else:
        io.error("name an item ID, or --all")
        return 2
    by_source: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_source.setdefault(e["source"], []).append(e)
    configured = {s.name: s for s in settings.sources()}
    failed = 0
    for source, items in by_source.items():
        if source not in configured:
            io.error(f"{source}: not in the config; its items stay (drop them with `commsync quarantine drop`)")
            failed += len(items)
            continue
        config = configured[source]
        connector = registry.kind_of(config).build(config, registry.BuildContext(settings, None))
        try:
            report = await quarantine.retry(store, StoreSink(store), connector, items)
        finally:
            await connector.aclose()
        for e in items:
            item = e.get("item_id")
            outcome = "stored" if item in report.stored else "no longer on the server: let go" if item in report.gone else "still failing"
            if outcome == "still failing" and e.get("stream") in report.errors:
                outcome += f" ({report.errors[e['stream']]})"
            io.print(f"{e['_id']}: {outcome}")
        failed += len([e for e in items if e.get("item_id") not in report.stored and e.get("item_id") not in report.gone])
    return 1 if failed else 0


async def quarantine_drop(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    if not await store.quarantine_drop(args.id):
        io.error(f"no quarantine item {args.id!r} (see `commsync quarantine list`)")
        return 2
    io.print(f"dropped {args.id}")
    return 0


async def source_resume(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    names = [s.name for s in settings.sources()]
    if args.name not in names:
        io.error(f"no source {args.name!r} in the config (it has: {', '.join(names) or 'none'})")
        return 2
    doc = await store.source_status(args.name)
    if not doc or doc.get("state") != "parked":
        io.print(f"{args.name} is not parked (state: {(doc or {}).get('state', 'never run')}); nothing to resume")
        return 0
    await store.request_resume(args.name)
    io.print(f"asked the instance working {args.name} to log in again (within about 10 s); `commsync status` shows the outcome")
    return 0
