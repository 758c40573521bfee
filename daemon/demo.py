"""`commsync demo`: the whole capture path on a bundled sample, with no server at all."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from commsync.config import settings_from_dict
from commsync.connectors.mbox import MboxConnector

from . import app
from .runner import Runner, StoreSink

DEMO_CONFIG = {
    "mongodb": {"uri": "memory://", "database": "commsync_demo"},
    "internal_domains": ["ourco.example"],
}


def demo_files() -> tuple[Path, Path]:
    """The sample mbox and customers shipped with the package."""
    base = resources.files("commsync.daemon") / "demo_data"
    return Path(str(base / "sample.mbox")), Path(str(base / "customers.json"))


async def run_demo(out: TextIO) -> int:
    """Import the sample mailbox into an in-memory store and print the customer histories."""
    settings = settings_from_dict(DEMO_CONFIG, origin="demo")
    mbox_path, customers_path = demo_files()
    customers = json.loads(customers_path.read_text(encoding="utf-8"))

    store = app.open_store(settings)
    await store.customers.insert_many(customers)
    await store.ensure_indexes()
    # Parsing inline keeps the demo instant; `run` uses a process pool.
    parser = app.mail_parser(settings, None, frozenset())
    connector = MboxConnector(mbox_path, parser, name="demo")
    sink = _CountingSink(store)
    runner = Runner([connector], sink, once=True)
    ok = await runner.run()

    records = await store.records.count_documents({})
    unmatched = await store.records.count_documents({"customer_ids": []})
    histories = await store.history.find().sort("last_at", -1).to_list(None)
    names = {c["_id"]: c.get("name", c["_id"]) for c in customers}

    print(
        "commsync demo: in-memory store (memory://); nothing is kept after this command.\n"
        f"Imported {mbox_path.name}: {records} records ({unmatched} matched no customer), "
        f"{len(histories)} customer histories."
        + "".join(f"\nNot captured ({reason}): {n}" for reason, n in sorted(sink.not_captured.items()))
        + "\n",
        file=out,
    )
    print(_table(histories, names), file=out)
    return 0 if ok else 1


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
    head = ("customer", "total", "in", "out", "first contact", "last contact", "last")
    rows = [
        (
            f"{names.get(h['_id'], h['_id'])} ({h['_id']})",
            str(h["total"]),
            str(h["inbound"]),
            str(h["outbound"]),
            h["first_at"].strftime("%Y-%m-%d %H:%M"),
            h["last_at"].strftime("%Y-%m-%d %H:%M"),
            f"{h['last_channel']} {h['last_direction']}",
        )
        for h in histories
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'>' if i in (1, 2, 3) else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])
