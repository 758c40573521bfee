"""How long `commsync verify` takes on a synced folder, on loopback.

Starts the tests' Dovecot and a MongoDB server (SecantusDB, tests/mongo_server.py),
fills one folder with the business corpus, captures it with `commsync run --once`,
then times `commsync verify` (the real console script, a fresh process each time:
start-up included) and the same with `--repair` when nothing is missing.

    .venv/bin/python tests/bench_verify.py [--messages 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_corpus import CORPORA  # noqa: E402
from bench_imap import fill_mailbox  # noqa: E402
from dovecot import DovecotServer  # noqa: E402
from mongo_server import MongoTestServer  # noqa: E402

COMMSYNC = str(Path(sys.executable).with_name("commsync"))


def timed(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{argv} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with DovecotServer() as dovecot, MongoTestServer() as mongo:
        user = dovecot.new_user("verify")
        size, fill_s = fill_mailbox(dovecot, user, CORPORA["business"], 0, args.messages, 7)
        config = Path(tempfile.mkdtemp()) / "commsync.json"
        config.write_text(
            json.dumps(
                {
                    "mongodb": {"uri": mongo.uri, "database": "bench_verify"},
                    "log_level": "warning",
                    "mailboxes": [dovecot.mailbox(user, folders=["INBOX"])],
                }
            )
        )
        capture_s, _ = timed([COMMSYNC, "run", "--once", "--quiet", "-c", str(config)])
        runs = []
        for _ in range(args.runs):
            seconds, out = timed([COMMSYNC, "verify", "--json", "-c", str(config)])
            report = json.loads(out.splitlines()[0])
            assert report["remote"] == args.messages and report["missing"] == [], report
            runs.append(seconds)
        print(f"{args.messages} messages ({size / 2**20:.1f} MiB, filled in {fill_s:.1f} s, captured by run --once in {capture_s:.1f} s)")
        print(
            f"commsync verify, one folder: median {statistics.median(runs):.2f} s, best {min(runs):.2f} s "
            f"(runs: {', '.join(f'{r:.2f}' for r in runs)}); stored {report['stored']}, excluded {report['excluded']}"
        )


if __name__ == "__main__":
    main()
