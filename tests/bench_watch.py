"""How fast `commsync watch` turns record writes into lines, on loopback.

Starts a private SecantusDB, runs the real `commsync watch --json` process
(with or without a resume file), then:

- latency: writes one record at a time and times each from the moment
  `write_batch` returned until its line is read from the process's stdout;
- throughput: writes a batch of records at once and times from the write until
  the last line, with the resume file saved (fsync'd) after every line.

    .venv/bin/python tests/bench_watch.py [--records 20] [--batch 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from commsync.daemon.store import Store  # noqa: E402

from mongo_server import MongoTestServer  # noqa: E402
from records import email_record  # noqa: E402

COMMSYNC = Path(sys.executable).with_name("commsync")


def _start(config: Path, resume: Path | None) -> subprocess.Popen:
    args = [str(COMMSYNC), "watch", "--json", "-c", str(config)] + (["--resume-file", str(resume)] if resume else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "watch_started" not in proc.stderr.readline():
        pass
    return proc


def _stop(proc: subprocess.Popen) -> float:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return time.monotonic() - started


async def run(records: int, batch: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    with MongoTestServer() as server:
        config = tmp / "commsync.yaml"
        config.write_text(json.dumps({"mongodb": {"uri": server.uri, "database": "bench"}}))
        store = Store.connect(server.uri, "bench")
        await store.ensure_indexes()
        for resume in (None, tmp / "watch.resume"):
            label = "with --resume-file" if resume else "without resume file"
            proc = _start(config, resume)
            latencies = []
            for i in range(records):
                await store.write_batch([email_record(f"{label}-one-{i}")])
                written = time.monotonic()
                await asyncio.to_thread(proc.stdout.readline)
                latencies.append(time.monotonic() - written)
            docs = [email_record(f"{label}-batch-{i}", uid=i) for i in range(batch)]
            started = time.monotonic()
            await store.write_batch(docs)
            written = time.monotonic()
            for _ in range(batch):
                await asyncio.to_thread(proc.stdout.readline)
            done = time.monotonic()
            stop = _stop(proc)
            print(
                f"{label}: latency median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
                f"({records} single writes); batch of {batch}: write {written - started:.2f} s, "
                f"last line {done - written:.2f} s after it ({batch / (done - started):.0f} lines/s end to end); SIGTERM to exit {stop:.2f} s"
            )
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(run(args.records, args.batch))


if __name__ == "__main__":
    main()
