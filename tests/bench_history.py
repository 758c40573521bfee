"""What one batch costs when its customer has a long past: history by deltas vs recomputation.

Starts a private SecantusDB (a one-member replica set, so transactions work),
gives one customer ``--past`` records and another ``--small`` records, then
writes batches of ``--batch-size`` new records for each and times them (the
whole `Store.write_batch`: reads, records, history) and counts the commands
sent (round trips). Once on the transaction path (deltas), once with
transactions turned off (the recomputation a standalone mongod gets). Prints
a markdown table; tests/README.md quotes it.

    .venv/bin/python tests/bench_history.py [--past 100000] [--batches 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from commsync.daemon import history, logs  # noqa: E402
from commsync.daemon.store import Store  # noqa: E402

from mongo_server import MongoTestServer  # noqa: E402
from records import T0, email_record, hours  # noqa: E402

BIG, SMALL = "c-big", "c-small"
ADDRESS = {BIG: "big@example.com", SMALL: "small@example.com"}


async def fill(store: Store, customer: str, n: int) -> None:
    """``n`` past records of ``customer``, inserted directly (capture would take longer and change nothing)."""
    chunk = []
    for i in range(n):
        record = email_record(f"{customer}-past-{i}", ADDRESS[customer], at=T0 + hours(i / 60), uid=i)
        chunk.append({**record, "customer_ids": [customer], "schema_version": 1, "ingested_at": T0})
        if len(chunk) == 5000:
            await store.records.insert_many(chunk)
            chunk = []
    if chunk:
        await store.records.insert_many(chunk)


async def batches(store: Store, label: str, count: int, size: int) -> dict[str, tuple[float, float]]:
    """Per customer, median seconds and round trips of ``count`` batches of ``size`` new records.

    The two customers take turns, so whatever the server does in the background weighs on both alike.
    """
    seconds: dict[str, list[float]] = {SMALL: [], BIG: []}
    trips: dict[str, list[int]] = {SMALL: [], BIG: []}
    for b in range(count + 1):
        for customer in (SMALL, BIG):
            at = T0 + hours(24 * 365 * 3 + b)
            batch = [email_record(f"{customer}-{label}-{b}-{i}", ADDRESS[customer], at=at + hours(i / 1000), uid=i) for i in range(size)]
            before = store.commands.count
            started = time.perf_counter()
            await store.write_batch(batch)
            elapsed = time.perf_counter() - started
            if b:  # the first round warms the connection pool and caches
                seconds[customer].append(elapsed)
                trips[customer].append(store.commands.count - before)
    return {c: (statistics.median(seconds[c]), statistics.median(trips[c])) for c in (SMALL, BIG)}


async def run(uri: str, past: int, small: int, count: int, size: int) -> list[tuple[str, int, float, float]]:
    store = Store.connect(uri, "bench_history")
    await store.customers.insert_many([{"_id": cid, "emails": [address]} for cid, address in ADDRESS.items()])
    started = time.perf_counter()
    await fill(store, BIG, past)
    await fill(store, SMALL, small)
    await store.ensure_indexes()  # after the bulk load: building them once is faster than maintaining them
    await store.rebuild_history(write=True)
    print(f"filled {past + small} records in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for transactions in (True, False):
        store.transactions = transactions
        path = "deltas in a transaction" if transactions else "recomputation (no transactions)"
        measured = await batches(store, f"t{int(transactions)}", count, size)
        for customer, n in ((SMALL, small), (BIG, past)):
            rows.append((path, n, *measured[customer]))
    check = await store.check_history()
    assert not check.differences, check.differences
    print(f"histories equal a rebuild: {check.customers} customers", file=sys.stderr)
    big = history.comparable(await store.history.find_one({"_id": BIG}))
    print(f"{BIG}: total {big['total']}", file=sys.stderr)
    store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--past", type=int, default=100_000, help="records of the customer with a long past")
    parser.add_argument("--small", type=int, default=10, help="records of the other customer")
    parser.add_argument("--batches", type=int, default=7, help="batches per measurement (median)")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    logs.configure("warning")
    with MongoTestServer() as server:
        rows = asyncio.run(run(server.uri, args.past, args.small, args.batches, args.batch_size))
    print(f"| history path | customer's past records | median s per batch of {args.batch_size} | round trips per batch |")
    print("|---|---:|---:|---:|")
    for path, n, seconds, trips in rows:
        print(f"| {path} | {n:,} | {seconds:.3f} | {trips:g} |")


if __name__ == "__main__":
    main()
