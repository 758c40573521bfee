"""The admin and integrator commands: records, history, customers, purge, rematch, init-db.

Each command is an ``action(store, settings, args, console) -> exit code``;
the handler argparse calls opens the configured store around it. Tests call
the actions with a store of their own (a memory:// store lives in one
process only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from commsync.connectors import registry

from . import admin, app, policy, queries
from .schema import SCHEMA_VERSION
from .store import Store, id_variants
from .text import cut, json_default

Action = Callable[[Store, Any, argparse.Namespace, "Console"], Awaitable[int]]


def _ask_stdin(prompt: str) -> bool:
    print(prompt, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


@dataclass
class Console:
    """Where a command writes (stdout: its output; stderr: messages) and how it asks for confirmation."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    confirm: Callable[[str], bool] = _ask_stdin

    def print(self, *parts: Any) -> None:
        print(*parts, file=self.out)

    def error(self, text: str) -> None:
        print(f"commsync: {text}", file=self.err)


def _with_store(action: Action) -> Callable[[Any, argparse.Namespace], Awaitable[int]]:
    async def handler(settings: Any, args: argparse.Namespace) -> int:
        store = app.open_store(settings)
        try:
            return await action(store, settings, args, Console())
        finally:
            store.close()

    return handler


def _command(parser: argparse.ArgumentParser, action: Action) -> None:
    parser.set_defaults(handler=_with_store(action), action=action)


# -- arguments ---------------------------------------------------------------------------


def _when(text: str) -> Any:
    try:
        return queries.parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _filter_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (all must hold)")
    g.add_argument("--customer", metavar="ID", help="records linked to this customer")
    g.add_argument("--channel", choices=registry.channels())
    g.add_argument("--direction", choices=["inbound", "outbound"])
    g.add_argument("--since", type=_when, metavar="WHEN", help="at or after: 2025-03-01, 2025-03-01T09:30, or 30d (ago)")
    g.add_argument("--until", type=_when, metavar="WHEN", help="before (same forms)")
    g.add_argument("--participant", metavar="ADDRESS_OR_NUMBER", help="an email address or phone number taking part")
    g.add_argument("--text", metavar="WORDS", help="every word in the subject or content (case-insensitive)")


def filters_from(args: argparse.Namespace, region: str | None = None) -> queries.Filters:
    """The filters the command-line options ask for."""
    return queries.Filters(
        customer=tuple(id_variants(args.customer)) if args.customer else (),
        channel=args.channel,
        direction=args.direction,
        since=args.since,
        until=args.until,
        participant=tuple(policy.participant_keys(args.participant, region)) if args.participant else (),
        text=args.text,
    )


def register(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """Add the admin commands to the `commsync` subcommands."""
    records = sub.add_parser("records", help="list, show, export and delete records")
    rsub = records.add_subparsers(dest="records_command", required=True)

    ls = with_config(rsub.add_parser("list", help="records matching the filters, newest first"))
    _filter_options(ls)
    ls.add_argument("--limit", type=_positive, default=50, help="at most this many (default: %(default)s)")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _command(ls, records_list)

    show = with_config(rsub.add_parser("show", help="one whole record, as JSON"))
    show.add_argument("id")
    _command(show, records_show)

    export = with_config(rsub.add_parser("export", help="records matching the filters as JSON lines or CSV, streamed"))
    _filter_options(export)
    export.add_argument("--limit", type=_positive, help="at most this many (default: all)")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("-o", "--output", type=Path, help="write to this file (default: stdout)")
    _command(export, records_export)

    delete = with_config(rsub.add_parser("delete", help="delete records matching the filters (they never come back)"))
    _filter_options(delete)
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _command(delete, records_delete)

    hist = sub.add_parser("history", help="customer histories")
    hsub = hist.add_subparsers(dest="history_command", required=True)
    hshow = with_config(hsub.add_parser("show", help="a customer's history document and latest records"))
    hshow.add_argument("customer", metavar="CUSTOMER")
    hshow.add_argument("--records", type=int, default=10, metavar="N", help="how many latest records (default: %(default)s)")
    hshow.add_argument("--json", action="store_true", help="one JSON document instead of text")
    _command(hshow, history_show)

    customers = sub.add_parser("customers", help="forget or import customers")
    csub = customers.add_subparsers(dest="customers_command", required=True)
    forget = with_config(csub.add_parser("forget", help="remove a customer from every record and stop capturing them"))
    forget.add_argument("customer", metavar="ID")
    forget.add_argument("--address", action="append", default=[], metavar="ADDRESS_OR_NUMBER", help="also suppress this (repeatable)")
    forget.add_argument("--keep-orphans", action="store_true", help="keep records left with no customer (default: customers.keep_orphans)")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _command(forget, customers_forget)
    imp = with_config(csub.add_parser("import", help="upsert customers from CSV or JSON lines (id, name, emails, phones)"))
    imp.add_argument("file", type=Path)
    imp.add_argument("--format", choices=["csv", "jsonl"], help="default: by the file's extension (.csv, else JSON lines)")
    _command(imp, customers_import)

    purge = with_config(sub.add_parser("purge", help="delete records older than retention.days now"))
    purge.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    _command(purge, purge_records)

    rematch = with_config(sub.add_parser("rematch", help="re-link stored records to customers as they are now"))
    rematch.add_argument("--customer", metavar="ID", help="only the records of, or naming an address of, this customer")
    _command(rematch, rematch_records)

    init = with_config(sub.add_parser("init-db", help="create the indexes and install the schema validators"))
    _command(init, init_db)


# -- output --------------------------------------------------------------------------------


def _counterpart(doc: Mapping[str, Any]) -> str:
    participants = doc.get("participants") or []
    external = [p for p in participants if not p.get("internal")]
    chosen = external or participants
    if not chosen:
        return ""
    more = f" +{len(chosen) - 1}" if len(chosen) > 1 else ""
    return (chosen[0].get("address") or "") + more


def table(docs: Iterable[Mapping[str, Any]], width: int | None = None) -> list[str]:
    """Records as aligned text rows: when (UTC), channel, direction, counterpart, customers, subject, id."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = []
    for d in docs:
        at = d.get("occurred_at")
        rows.append(
            [
                at.strftime("%Y-%m-%d %H:%M") if at else "",
                d.get("channel") or "",
                {"inbound": "in", "outbound": "out"}.get(d.get("direction"), ""),
                cut(_counterpart(d), 32),
                cut(",".join(str(c) for c in d.get("customer_ids", ())) or "-", 24),
                d.get("subject") or d.get("content") or "",
                str(d.get("_id")),
            ]
        )
    head = ["WHEN (UTC)", "CHANNEL", "DIR", "WITH", "CUSTOMERS", "SUBJECT", "ID"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    # The subject takes what the terminal has left; it is cut, the id never is.
    fixed = sum(w + 2 for i, w in enumerate(widths) if i != 5)
    widths[5] = max(20, min(widths[5], width - fixed))
    for r in rows:
        r[5] = cut(r[5], widths[5])
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return [fmt.format(*head).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def _pretty(doc: Any) -> str:
    return json.dumps(doc, indent=2, default=json_default, ensure_ascii=False)


# -- actions ----------------------------------------------------------------------------------


async def records_list(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    q = queries.query(filters_from(args, store.default_region))
    docs = [d async for d in admin.cursor(store, q, sort=queries.SORT, limit=args.limit)]
    if args.json:
        for d in docs:
            io.print(admin.json_line(d))
    elif docs:
        io.print("\n".join(table(docs)))
    else:
        io.print("no records match")
    return 0


async def records_show(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    doc = await store.record(id_variants(args.id))
    if doc is None:
        io.error(f"no record {args.id!r}")
        return 1
    io.print(_pretty(doc))
    return 0


async def records_export(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    q = queries.query(filters_from(args, store.default_region))
    docs = admin.cursor(store, q, sort=queries.SORT, limit=args.limit)
    if args.output is None:
        n = await admin.export(docs, io.out, args.format)
        print(f"exported {n} records", file=io.err)
        return 0
    with args.output.open("w", encoding="utf-8", newline="") as handle:
        n = await admin.export(docs, handle, args.format)
    io.print(f"exported {n} records to {args.output}")
    return 0


async def records_delete(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    f = filters_from(args, store.default_region)
    if f.is_empty():
        io.error("records delete needs at least one filter (e.g. --customer, --until)")
        return 2
    q = queries.query(f)
    selected = await admin.count(store, q)
    io.print(f"{selected.records} records of {selected.customers} customers match")
    if not selected.records:
        return 0
    if not args.yes and not io.confirm(f"delete {selected.records} records for good? [y/N] "):
        io.print("nothing deleted")
        return 1
    done = await admin.delete(store, q)
    io.print(f"deleted {done.records} records; recomputed the histories of {done.customers} customers")
    return 0


async def history_show(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    customer, ids = await admin.find_customer(store, args.customer)
    hist = await store.history_of(ids)
    if customer is None and hist is None:
        io.error(f"no customer and no history {args.customer!r}")
        return 1
    latest = []
    if args.records > 0:
        latest = [d async for d in admin.cursor(store, {"customer_ids": {"$in": ids}}, sort=queries.SORT, limit=args.records)]
    if args.json:
        io.print(json.dumps({"customer": customer, "history": hist, "records": latest}, default=json_default, ensure_ascii=False))
        return 0
    name = (customer or {}).get("name")
    io.print(f"customer {ids[0]}" + (f" ({name})" if name else "") + ("" if customer else " (not in the customers collection)"))
    io.print(_pretty(hist) if hist else "no history: no records involve this customer")
    if latest:
        io.print(f"\nlatest {len(latest)} records:")
        io.print("\n".join(table(latest)))
    return 0


async def customers_forget(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    customer, ids = await admin.find_customer(store, args.customer)
    if customer is None:
        io.error(f"no customer {args.customer!r} in the customers collection: only its id is removed from records"
                 + ("" if args.address else "; pass --address to suppress its addresses too"))
    keep = args.keep_orphans or settings.customers.keep_orphans
    selected = await admin.count(store, {"customer_ids": {"$in": ids}})
    keys = admin.customer_keys(customer or {}, store.default_region) | {k for a in args.address if (k := policy.key_of(a, store.default_region))}
    io.print(f"customer {ids[0]}: {selected.records} records, {len(keys)} addresses and numbers to suppress")
    if not args.yes and not io.confirm(f"forget customer {ids[0]} for good? [y/N] "):
        io.print("nothing changed")
        return 1
    report = await admin.forget(store, args.customer, keep_orphans=keep, extra=args.address)
    if customer is None:
        document = "not found"
    elif report.customer_deleted:
        document = "deleted (created by commsync)"
    else:
        document = "left in place (it belongs to the CRM: delete it there)"
    io.print(f"forgot customer {report.customer}:")
    lines = [
        ("records deleted (no other customer left)", f"{report.deleted}" + (" (orphans kept: keep_orphans)" if keep else "")),
        ("records kept for other customers, unlinked", report.unlinked),
        ("addresses and numbers newly suppressed", report.suppressed),
        ("history document deleted", "yes" if report.history_deleted else "there was none"),
        ("histories recomputed for other customers", len(report.others)),
        ("customer document", document),
    ]
    for label, value in lines:
        io.print(f"  {label:<44}{value}")
    return 0


async def customers_import(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    if not args.file.is_file():
        io.error(f"{args.file}: no such file")
        return 2
    report = await admin.import_customers(store, admin.read_customers(args.file, args.format, store.default_region))
    io.print(
        f"imported {args.file}: {report.inserted} new and {report.updated} updated customers, "
        f"{len(report.rejected)} rows rejected; re-linked {report.rematch.relinked} records"
    )
    for line, reason in report.rejected:
        io.error(f"{args.file}:{line}: {reason}")
    return 1 if report.rejected else 0


async def purge_records(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    days = settings.retention.days
    if not days:
        io.error("retention.days is not set in the config: nothing to purge")
        return 2
    result = await admin.purge(store, days, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "purged"
    io.print(f"{verb} {result.records} records older than {days} days; histories of {result.customers} customers "
             + ("would be recomputed" if args.dry_run else "recomputed"))
    return 0


async def rematch_records(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    report = await admin.rematch(store, args.customer)
    io.print(f"examined {report.examined} records; re-linked {report.relinked}; recomputed the histories of {len(report.customers)} customers")
    return 0


async def init_db(store: Store, settings: Any, args: argparse.Namespace, io: Console) -> int:
    installed = await store.init_db(strict=True)
    io.print("indexes: ok")
    if installed:
        io.print(f"validators: installed on records and customer_history (schema_version {SCHEMA_VERSION}, level moderate)")
    else:
        io.print("validators: skipped (memory:// does not enforce them)")
    return 0
