"""`commsync watch`: one line on stdout per record inserted, updated or deleted, as the store writes it.

It follows a MongoDB change stream on `records` (a replica set is needed; one
member is enough). With ``--resume-file`` the stream's resume token is saved
after every line printed and flushed, so a restart continues exactly where the
last run stopped. A server that goes away is waited for with backoff and the
stream reopened from the last token: no line twice, none skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import structlog

from commsync.config import Settings

from . import retry
from .store import (
    Change,
    ChangesInterrupted,
    ChangeStreamsUnsupported,
    RecordsInvalidated,
    ResumePointLost,
    Store,
    token_from_json,
    token_json,
)
from .text import ERROR_CHARS, cut, describe, json_default

log = structlog.get_logger(__name__)

# Reconnecting: 1 s, 2 s, 4 s ... up to half a minute (jittered): an integrator's feed should come back soon.
RECONNECT = retry.RetryPolicy(backoff_max=timedelta(seconds=30))
# Each wait for changes on the server is this long at most: a stop request is seen within it.
WAIT = 0.5
# A server that is down is given up on after this long per attempt (then backoff), so a stop
# request during an outage is not held up by the configured server selection timeout.
SELECT_TIMEOUT = timedelta(seconds=2)
# With no changes, the stream's position still moves on; it is saved this often so that a quiet
# `records` collection does not leave the saved token behind the server's oplog window.
IDLE_SAVE_EVERY = 60.0

NEEDS_REPLICA_SET = (
    "commsync watch needs a MongoDB replica set (change streams): {why}. "
    "A one-member replica set is enough: start mongod with --replSet rs0 (or replication.replSetName: rs0 "
    "in mongod.conf), run rs.initiate() once in mongosh, and add ?replicaSet=rs0 to mongodb.uri."
)


def register(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """Add `commsync watch` to the subcommands."""
    p = with_config(sub.add_parser("watch", help="print a line per record inserted, updated or deleted, as it happens"))
    p.add_argument("--json", action="store_true", help="JSON lines: _id, operation, time, record")
    p.add_argument("--resume-file", type=Path, metavar="PATH", help="save the stream position here after each line; continue from it when started again")
    p.set_defaults(handler=watch_command)


# -- output ------------------------------------------------------------------------------


def json_line(change: Change) -> str:
    """A change as one JSON object: the record's _id, the operation, the time (ISO 8601) and the record (null on delete)."""
    doc = {"_id": change.record_id, "operation": change.operation, "time": change.at.isoformat(), "record": change.record}
    return json.dumps(doc, default=json_default, ensure_ascii=False)


def text_line(change: Change) -> str:
    """A change for people: time, operation, id, channel, customers, subject."""
    record = change.record or {}
    customers = ",".join(str(c) for c in record.get("customer_ids") or ()) or "-"
    parts = [change.at.isoformat(), f"{change.operation:<6}", str(change.record_id)]
    if change.operation != "delete":
        parts += [str(record.get("channel") or "-"), customers, cut(record.get("subject") or "", 120)]
    return "  ".join(parts).rstrip()


# -- the resume file ------------------------------------------------------------------------


class ResumeFile:
    """Where a run saves its position (the resume token) and the next run reads it."""

    def __init__(self, path: Path, database: str):
        self.path = path
        self.database = database
        self.saved_at: str | None = None

    def load(self) -> dict[str, Any] | None:
        """The saved token, None when there is no file yet; ValueError when it cannot be used."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"cannot read it: {describe(exc)}") from None
        try:
            doc = json.loads(text)
            if not isinstance(doc, Mapping):
                raise ValueError("not a JSON object")
            self.saved_at = doc.get("saved_at")
            if doc.get("database") != self.database:
                raise ValueError(f"it belongs to database {doc.get('database')!r}, not {self.database!r}")
            return token_from_json(doc.get("token"))
        except ValueError as exc:
            raise ValueError(cut(str(exc), ERROR_CHARS)) from None

    def save(self, token: Mapping[str, Any]) -> None:
        """Replace the file atomically (readable by its owner only): a crash leaves the old token or the new one."""
        self.saved_at = datetime.now(UTC).isoformat(timespec="seconds")
        body = json.dumps({"database": self.database, "saved_at": self.saved_at, "token": token_json(token)})
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- following the stream ---------------------------------------------------------------------


class Follower:
    """Prints changes to ``out`` and saves the position after each; reconnects when the server goes away."""

    def __init__(self, store: Store, out: TextIO, *, as_json: bool, resume: ResumeFile | None, stop: asyncio.Event):
        self.store = store
        self.out = out
        self.format = json_line if as_json else text_line
        self.resume = resume
        self.stop = stop
        self.lines = 0
        self._saved: Mapping[str, Any] | None = None

    async def run(self, token: Mapping[str, Any] | None) -> None:
        """Until ``stop`` is set; raises what cannot be retried (see `Store.record_changes`)."""
        attempt, opened = 0, False
        last_save = time.monotonic()
        self._saved = token
        try:
            while not self.stop.is_set():
                try:
                    async with self.store.record_changes(token, wait=WAIT) as changes:
                        log.info("watch_resumed" if opened else "watch_started", resumed=token is not None, database=self.store.db.name)
                        attempt, opened = 0, True
                        if token is None and changes.token is not None:
                            # From now on: a restart begins here even if nothing arrives before it.
                            token = changes.token
                            await self._save(token)
                        while not self.stop.is_set():
                            change = await changes.next()
                            if change is not None:
                                self.out.write(self.format(change) + "\n")
                                self.out.flush()
                                self.lines += 1
                            if changes.token is None or changes.token == token:
                                continue
                            token = changes.token
                            if change is not None or time.monotonic() - last_save >= IDLE_SAVE_EVERY:
                                await self._save(token)
                                last_save = time.monotonic()
                except ChangesInterrupted as exc:
                    attempt += 1
                    delay = RECONNECT.delay(retry.UNAVAILABLE, attempt)
                    log.warning("watch_interrupted", error=describe(exc), attempt=attempt, retry_in=round(delay, 1))
                    try:
                        await asyncio.wait_for(self.stop.wait(), delay)
                    except TimeoutError:
                        pass
        finally:
            if token is not None and token != self._saved:
                await self._save(token)

    async def _save(self, token: Mapping[str, Any]) -> None:
        if self.resume is not None:
            # A write and an fsync per change: off the event loop, awaited so the order stays
            # print, save, next (a crash never leaves the saved token ahead of the output).
            await asyncio.to_thread(self.resume.save, token)
        self._saved = token


async def watch_command(settings: Settings, args: Any) -> int:
    """`commsync watch`: 0 after a stop request, 1 when the stream cannot go on, 2 without change streams or a writable resume file."""
    m = settings.mongodb
    if m.uri.startswith("memory://"):
        return _fail(2, NEEDS_REPLICA_SET.format(why="mongodb.uri is memory:// (mongomock), which has no change streams"))
    resume = ResumeFile(args.resume_file, m.database) if args.resume_file else None
    token = None
    if resume is not None:
        if not os.access(resume.path.parent, os.W_OK | os.X_OK):
            # Found out now rather than after the first line, whose position could not be kept.
            return _fail(2, f"resume file {resume.path}: cannot write to {resume.path.parent}")
        try:
            token = resume.load()
        except ValueError as exc:
            return _fail(1, f"resume file {resume.path}: {exc}. {_start_over(resume)}")
    store = Store.connect(
        m.uri,
        m.database,
        customers=settings.customers.collection,
        timeout_ms=int(min(m.server_selection_timeout, SELECT_TIMEOUT).total_seconds() * 1000),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    follower = Follower(store, sys.stdout, as_json=args.json, resume=resume, stop=stop)
    try:
        await follower.run(token)
    except ChangeStreamsUnsupported as exc:
        return _fail(2, NEEDS_REPLICA_SET.format(why=f"the server has none ({cut(str(exc), 200)})"))
    except ResumePointLost as exc:
        where = f"the position saved in {resume.path}" if resume else "the saved position"
        since = f" (saved {resume.saved_at})" if resume and resume.saved_at else ""
        return _fail(
            1,
            f"cannot resume from {where}{since}: the server no longer has that history ({cut(str(exc), 200)}). "
            f"Every change since then was missed and cannot be replayed. {_start_over(resume)}",
        )
    except RecordsInvalidated as exc:
        return _fail(1, f"{exc}: every record it held is gone without a delete line. {_start_over(resume)}")
    except BrokenPipeError:
        # The consumer went away; the line it did not take has no saved token, so the next run prints it again.
        # stdout points at nothing from here on, so the interpreter's last flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        log.error("watch_output_closed", lines=follower.lines)
        return 1
    except Exception as exc:
        return _fail(1, f"watch failed: {describe(exc)}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        store.close()
    log.info("watch_stopped", lines=follower.lines)
    return 0


def _start_over(resume: ResumeFile | None) -> str:
    since = (resume.saved_at or "")[:10] if resume else ""
    delete = f"delete {resume.path}, " if resume else ""
    export = f"`commsync records export --since {since}`" if since else "`commsync records export`"
    return (
        f"To start over: {delete}start `commsync watch` again, and catch up with {export} "
        "(--since selects by when a contact happened: a full export also catches backfilled ones; upsert by _id)."
    )


def _fail(code: int, message: str) -> int:
    print(f"commsync: {message}", file=sys.stderr, flush=True)
    return code
