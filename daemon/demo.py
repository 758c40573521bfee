"""`commsync demo`: the whole capture path on bundled samples, with no server and no network.

Mail comes from a sample mbox; calls, SMS and WhatsApp come from Twilio API
list pages replayed on 127.0.0.1 (``replay``) and read by the real Twilio
connector. Both go through the same Runner and StoreSink as ``commsync run``,
into an in-memory store that is gone when the command ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from commsync.config import settings_from_dict
from commsync.connectors.mbox import MboxConnector
from commsync.connectors.twilio_records import duration_text

from . import app
from .replay import Replay, ReplayServer
from .runner import Runner, StoreSink

MAIL_SOURCE = "demo"
TWILIO_SOURCE = "demo-twilio"
DEMO_CONFIG: dict[str, Any] = {
    "mongodb": {"uri": "memory://", "database": "commsync_demo"},
    "internal_domains": ["ourco.example"],
}
DEMO_TWILIO_ACCOUNT: dict[str, Any] = {
    "name": TWILIO_SOURCE,
    # Sent to the replay on 127.0.0.1 only; the replay does not check it.
    "auth_token": "demo-replay",
    # The sample starts in February 2025; the first pass reads from here on.
    "since": "2025-01-01",
    # Small pages, so the connector follows next_page_uri as it does on a busy account.
    "page_size": 4,
    # The agent's phone inbound calls are forwarded to (the child leg): ours, not a customer.
    "numbers": ["+14155550111"],
}
TWILIO_LISTS = ("calls.json", "messages.json", "recordings.json")
CHANNELS = ("email", "call", "sms", "whatsapp")


def demo_files() -> tuple[Path, Path]:
    """The sample mbox and customers shipped with the package."""
    base = resources.files("commsync.daemon") / "demo_data"
    return Path(str(base / "sample.mbox")), Path(str(base / "customers.json"))


def twilio_pages() -> list[Path]:
    """The Twilio list pages shipped with the package (calls, messages, recordings)."""
    base = resources.files("commsync.daemon") / "demo_data" / "twilio"
    return [Path(str(base / name)) for name in TWILIO_LISTS]


@dataclass
class DemoImport:
    """What the demo imported: the store holding it, and what to report about it."""

    store: Any
    customers: list[dict[str, Any]]
    ok: bool
    replay_requests: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    not_captured: dict[str, int] = field(default_factory=dict)


async def import_demo() -> DemoImport:
    """Import the sample mailbox and the replayed Twilio account into a fresh in-memory store."""
    mbox_path, customers_path = demo_files()
    customers = json.loads(customers_path.read_text(encoding="utf-8"))
    replay = Replay.from_pages(twilio_pages())
    with ReplayServer(replay) as server:
        account = {**DEMO_TWILIO_ACCOUNT, "account_sid": replay.account_sid, "base_url": server.base_url}
        # The demo's settings are exactly its own: COMMSYNC_* variables meant for the service
        # (a real database, real Twilio accounts) must never reach it.
        settings = settings_from_dict({**DEMO_CONFIG, "twilio_accounts": [account]}, origin="demo", environment=False)
        store = app.open_store(settings)
        await store.customers.insert_many(customers)
        await store.ensure_indexes()
        # Parsing inline keeps the demo instant; `run` uses a process pool.
        parser = app.mail_parser(settings, None, frozenset())
        connectors = [MboxConnector(mbox_path, parser, name=MAIL_SOURCE), *app.build_connectors(settings, None)]
        sink = _CountingSink(store)
        runner = Runner(connectors, sink, once=True)
        ok = await runner.run()
    failures = {name: s.last_error for name, s in runner.status.items() if s.last_error}
    return DemoImport(store, customers, ok, list(server.requests), failures, sink.not_captured)


async def run_demo(out: TextIO) -> int:
    """Import the samples into an in-memory store and print the customer histories."""
    demo = await import_demo()
    try:
        print(await report(demo), file=out)
    finally:
        demo.store.close()
    return 0 if demo.ok else 1


async def report(demo: DemoImport) -> str:
    """The demo's output: what was read from where, then one line per customer history."""
    store = demo.store
    records = await store.records.find({}, {"channel": 1, "customer_ids": 1, "sources.kind": 1}).to_list(None)
    histories = await store.history.find().sort("last_at", -1).to_list(None)
    names = {c["_id"]: c.get("name", c["_id"]) for c in demo.customers}
    mail = [r for r in records if _kind(r) == "mbox"]
    phone = [r for r in records if _kind(r) == "twilio"]
    by_channel = {ch: sum(1 for r in phone if r["channel"] == ch) for ch in ("call", "sms", "whatsapp")}
    lines = [
        "commsync demo: an in-memory store (memory://) and a replay of Twilio's API on 127.0.0.1;"
        " no network, and nothing is kept after this command.",
        f"Mail:   {demo_files()[0].name}, {len(mail)} records ({_unmatched(mail)} matched no customer).",
        f"Twilio: {by_channel['call']} calls, {by_channel['sms']} SMS, {by_channel['whatsapp']} WhatsApp ({_unmatched(phone)} matched no customer),"
        f" read by the Twilio connector in {len(demo.replay_requests)} API requests.",
        *(f"Not captured ({reason}): {n}" for reason, n in sorted(demo.not_captured.items())),
        *(f"FAILED {name}: {error}" for name, error in sorted(demo.failures.items())),
        f"{len(histories)} customer histories:",
        "",
        _table(histories, names),
    ]
    return "\n".join(lines)


def _kind(record: dict[str, Any]) -> str | None:
    sources = record.get("sources") or [{}]
    return sources[0].get("kind")


def _unmatched(records: list[dict[str, Any]]) -> int:
    return sum(1 for r in records if not r.get("customer_ids"))


class _CountingSink(StoreSink):
    """Adds up what the capture policy left out, to show it."""

    def __init__(self, store: Any):
        super().__init__(store)
        self.not_captured: dict[str, int] = {}

    async def write(self, source: str, batch: Any) -> Any:
        result = await super().write(source, batch)
        for reason, n in result.not_captured.items():
            self.not_captured[reason] = self.not_captured.get(reason, 0) + n
        return result


def _table(histories: list[dict[str, Any]], names: dict[Any, str]) -> str:
    head = ("customer", "total", "email", "calls", "sms", "whatsapp", "talk time", "in", "out", "first contact", "last contact", "last")
    numeric = {1, 2, 3, 4, 5, 6, 7, 8}
    rows = []
    for h in histories:
        channels = h.get("channels", {})
        count = {ch: str(channels.get(ch, {}).get("count", 0)) for ch in CHANNELS}
        talk = channels.get("call", {}).get("talk_seconds")
        rows.append(
            (
                f"{names.get(h['_id'], h['_id'])} ({h['_id']})",
                str(h["total"]),
                count["email"],
                count["call"],
                count["sms"],
                count["whatsapp"],
                duration_text(talk) if talk is not None else "-",
                str(h["inbound"]),
                str(h["outbound"]),
                h["first_at"].strftime("%Y-%m-%d %H:%M"),
                h["last_at"].strftime("%Y-%m-%d %H:%M"),
                f"{h['last_channel']} {h['last_direction']}",
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'>' if i in numeric else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(line.rstrip() for line in [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])
