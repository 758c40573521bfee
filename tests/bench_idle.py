"""How fast a new message reaches `records` on loopback, per folder: IDLE, NOTIFY and the LIST-STATUS check.

Starts a private Dovecot, runs the real runner (a 10-minute poll, so only the
server's push or the cheap check can bring mail in), APPENDs messages one at a
time to each configured folder in turn and times each from the APPEND's start
until its record is stored. Three ways of watching are measured:

* ``notify``: IDLE on INBOX with NOTIFY for the other folders (Dovecot offers it);
* ``list-status``: NOTIFY hidden, so the other folders are checked every
  ``check_every`` seconds (30 s by default; ``--check-every`` shortens it);
* ``idle``: INBOX alone, the configuration before NOTIFY.

    .venv/bin/python tests/bench_idle.py [--messages 10] [--check-every 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from commsync.config import settings_from_dict  # noqa: E402
from commsync.daemon import app, logs  # noqa: E402
from commsync.daemon.runner import Runner, StoreSink  # noqa: E402
from commsync.daemon.store import Store  # noqa: E402

from dovecot import DovecotServer  # noqa: E402
from mailgen import message  # noqa: E402

FOLDERS = ["INBOX", "Sent", "Archive"]


async def measure(server: DovecotServer, mode: str, count: int, check_every: float) -> dict[str, list[float]]:
    user = server.new_user("bench")
    folders = ["INBOX"] if mode == "idle" else FOLDERS
    settings = settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [server.mailbox(user, folders=folders)]})
    store = Store.connect("memory://", f"bench-{mode}")
    await store.ensure_indexes()
    (connector,) = app.build_connectors(settings, None)
    connector.check_every = check_every
    runner = Runner([connector], StoreSink(store), poll_interval=timedelta(minutes=10))
    task = asyncio.create_task(runner.run())
    while runner.status["m"].state != "waiting" or connector._client is None:
        await asyncio.sleep(0.01)
    if mode == "list-status":
        real = connector._client.has_capability
        connector._client.has_capability = lambda name: name != "NOTIFY" and real(name)
    client = server.client(user.name)
    results: dict[str, list[float]] = {f: [] for f in folders}
    try:
        n = 0
        for i in range(count):
            for folder in folders:
                await asyncio.sleep(0.3)  # let the worker settle back into IDLE
                started = time.monotonic()
                await asyncio.to_thread(client.append, folder, message(1000 * FOLDERS.index(folder) + i))
                n += 1
                while await store.records.count_documents({}) < n:
                    await asyncio.sleep(0.002)
                results[folder].append(time.monotonic() - started)
    finally:
        client.logout()
        runner.stop()
        await task
        store.close()
    return results


def summary(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[max(0, int(len(values) * 0.9) - 1)]
    return f"median {statistics.median(values) * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, max {values[-1] * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10, help="per folder")
    parser.add_argument("--check-every", type=float, default=30.0, help="seconds between LIST-STATUS checks without NOTIFY")
    parser.add_argument("--modes", default="notify,list-status,idle")
    args = parser.parse_args()
    logs.configure("warning")
    with DovecotServer() as server:
        for mode in args.modes.split(","):
            results = asyncio.run(measure(server, mode, args.messages, args.check_every))
            print(f"{mode}: APPEND to stored record, {args.messages} messages per folder")
            for folder, values in results.items():
                print(f"  {folder:<8} {summary(values)}")


if __name__ == "__main__":
    main()
