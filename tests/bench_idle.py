"""How fast a new message reaches `records` through IMAP IDLE, on loopback.

Starts a private Dovecot, runs the real runner (IDLE on INBOX, a 10-minute
poll so only the push can bring mail in), APPENDs messages one at a time and
times each from the APPEND's start until its record is stored. Prints the
figures the README quotes.

    .venv/bin/python tests/bench_idle.py [--messages 20]
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


async def measure(server: DovecotServer, count: int) -> list[tuple[float, float]]:
    user = server.new_user("bench")
    settings = settings_from_dict(
        {
            "mongodb": {"uri": "memory://"},
            "mailboxes": [
                server.mailbox(user, folders=["INBOX"])
            ],
        }
    )
    store = Store.connect("memory://", "bench")
    await store.ensure_indexes()
    runner = Runner(app.build_connectors(settings, None), StoreSink(store), poll_interval=timedelta(minutes=10))
    task = asyncio.create_task(runner.run())
    while runner.status["m"].state != "waiting":
        await asyncio.sleep(0.01)
    client = server.client(user.name)
    results = []
    try:
        for i in range(count):
            await asyncio.sleep(0.3)  # let the worker settle back into IDLE
            started = time.monotonic()
            await asyncio.to_thread(client.append, "INBOX", message(i))
            appended = time.monotonic()
            while await store.records.count_documents({}) < i + 1:
                await asyncio.sleep(0.002)
            results.append((appended - started, time.monotonic() - started))
    finally:
        client.logout()
        runner.stop()
        await task
        store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args()
    logs.configure("warning")
    with DovecotServer() as server:
        results = asyncio.run(measure(server, args.messages))
    total = sorted(r[1] for r in results)
    append = [r[0] for r in results]
    print(f"{len(total)} messages, APPEND to stored record (IDLE, loopback):")
    print(f"  median {statistics.median(total) * 1000:.0f} ms, p90 {total[int(len(total) * 0.9) - 1] * 1000:.0f} ms, max {total[-1] * 1000:.0f} ms")
    print(f"  of which the APPEND itself: median {statistics.median(append) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
