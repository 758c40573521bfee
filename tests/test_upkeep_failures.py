"""After-pass upkeep that fails: quarantine retries that cannot read their stream, verifies that break mid-way.

In-process sources on the memory store; the one with a real IMAP folder
deleted under it is at the end (Dovecot).
"""

from __future__ import annotations

import json
from datetime import timedelta

from imapclient.exceptions import IMAPClientError
from structlog.testing import capture_logs

from commsync.config import settings_from_dict
from commsync.connectors.base import Batch, MalformedItem, RemoteItem, SourceError, StreamMissing, TemporarilyUnavailable
from commsync.connectors.imap import FolderMissing
from commsync.daemon import app, quarantine, upkeep
from commsync.daemon.runner import Runner, StoreSink
from commsync.daemon.store import now_utc
from commsync.daemon.store.quarantine import FIRST_RETRY, MAX_ATTEMPTS
from commsync.daemon.upkeep import PassUpkeep

from mailgen import message
from records import email_record

# What a message body in an error could look like: it must never reach a log or an entry whole.
BODY = "Dear customer, " + "confidential " * 200


class Streams:
    """A source of named streams whose refetch and inventory fail on demand, per stream."""

    kind = "test"

    def __init__(self, name="m", refetch_errors=None, inventory_errors=None):
        self.name = name
        self.refetch_errors = dict(refetch_errors or {})
        self.inventory_errors = dict(inventory_errors or {})
        self.inventoried: list[str] = []

    async def batches(self, state):
        return
        yield  # pragma: no cover

    async def check(self):
        return "ok"

    async def aclose(self):
        return None

    async def refetch(self, stream, checkpoint, items):
        if stream in self.refetch_errors:
            raise self.refetch_errors[stream]
        ids = [item_id for item_id, _ in items]
        records = [email_record(f"{stream}-{i}@x", source=self.name, folder=stream, uid=i) for i in ids]
        yield Batch(stream, records, {}, item_ids=ids)

    async def inventory(self, stream, checkpoint):
        self.inventoried.append(stream)
        if stream in self.inventory_errors:
            raise self.inventory_errors[stream]
        return [RemoteItem(1, record_id=f"{stream}-1@x")]


async def quarantined(store, streams):
    """One entry per stream, due now, as a pass would have left them (then `quarantine retry` by hand)."""
    for stream in streams:
        await store.save_checkpoint("m", stream, {"uidvalidity": 1, "last_uid": 9})
        await store.quarantine_items("m", stream, [MalformedItem("the parser died", item_id=7, stream=stream, detail={"uidvalidity": 1})])
        assert await store.quarantine_retry_now(f"m/{stream}/7")


async def entry(store, stream):
    return await store.quarantine_get(f"m/{stream}/7")


async def test_a_retry_that_cannot_read_its_stream_counts_an_attempt_and_the_verify_still_runs(memory_store):
    await quarantined(memory_store, ["Archive", "INBOX", "Sent"])
    connector = Streams(
        refetch_errors={
            "Archive": FolderMissing("no folder 'Archive': [NONEXISTENT] Mailbox doesn't exist: Archive"),
            "Sent": TemporarilyUnavailable("HTTP 503 from the server: " + BODY),
        }
    )
    passes = PassUpkeep(memory_store, StoreSink(memory_store), verify_every=timedelta(hours=24))
    before = now_utc() - timedelta(seconds=1)  # the store keeps milliseconds
    with capture_logs() as logs:
        reports = await passes(connector)

    # The verify ran after the failed retries.
    assert [r.stream for r in reports] == ["Archive", "INBOX", "Sent"]
    # The stream that reads is retried as ever: stored, out of quarantine.
    assert await entry(memory_store, "INBOX") is None
    for stream in ("Archive", "Sent"):
        e = await entry(memory_store, stream)
        # One attempt further on, on the 5/20/80/320-minute schedule: not due after every pass.
        assert e["attempts"] == 1 and e["last_attempt_at"] >= before
        assert e["next_attempt_at"] - e["last_attempt_at"] == FIRST_RETRY
        assert len(e["last_error"]) <= 300
    assert await memory_store.quarantine_due("m") == []
    archive, sent = await entry(memory_store, "Archive"), await entry(memory_store, "Sent")
    # The gone folder is named in the entry's reason (not dropped in silence); an outage is not "gone".
    assert "gone" in archive["reason"] and "FolderMissing" in archive["reason"]
    assert sent["reason"] == "the parser died" and sent["last_error"].startswith("TemporarilyUnavailable: HTTP 503")
    failed = {e["stream"]: e for e in logs if e["event"] == "quarantine_retry_failed"}
    assert failed["Archive"]["stream_gone"] is True and failed["Sent"]["stream_gone"] is False
    assert all(e["source"] == "m" for e in failed.values())
    assert BODY not in json.dumps(logs, default=str)


async def test_a_stream_that_never_reads_again_ends_with_the_admin(memory_store):
    await quarantined(memory_store, ["Archive"])
    connector = Streams(refetch_errors={"Archive": FolderMissing("no folder 'Archive'")})
    sink = StoreSink(memory_store)
    for n in range(1, MAX_ATTEMPTS + 1):
        # Each pass that finds it due (the schedule is tested above; here each attempt is made due).
        await memory_store.quarantined.update_one({"_id": "m/Archive/7"}, {"$set": {"next_attempt_at": now_utc()}})
        report = await quarantine.retry_due(memory_store, sink, connector)
        assert report.failed == [7] and "FolderMissing" in report.errors["Archive"]
        assert (await entry(memory_store, "Archive"))["attempts"] == n
    assert (await entry(memory_store, "Archive"))["next_attempt_at"] is None  # `quarantine retry|drop` now
    assert await memory_store.quarantine_due_sources() == set()


async def test_a_retry_that_fails_outside_a_stream_is_logged_and_the_verify_still_runs(memory_store, monkeypatch):
    await quarantined(memory_store, ["INBOX"])

    async def down(source):
        raise ConnectionError("MongoDB went away")

    monkeypatch.setattr(memory_store, "quarantine_due", down)
    connector = Streams()
    passes = PassUpkeep(memory_store, StoreSink(memory_store), verify_every=timedelta(hours=24))
    with capture_logs() as logs:
        reports = await passes(connector)
    assert [r.stream for r in reports] == ["INBOX"] and connector.inventoried == ["INBOX"]
    (failed,) = [e for e in logs if e["event"] == "upkeep_retry_failed"]
    assert failed["source"] == "m" and failed["error"] == "ConnectionError: MongoDB went away"


async def test_a_verify_that_fails_is_not_started_again_at_every_pass(memory_store, monkeypatch):
    for stream in ("Archive", "INBOX"):
        await memory_store.save_checkpoint("m", stream, {"uidvalidity": 1, "last_uid": 9})
    connector = Streams(inventory_errors={"Archive": IMAPClientError("fetch failed")})
    passes = PassUpkeep(memory_store, StoreSink(memory_store), verify_every=timedelta(hours=24))

    reports = {r.stream: r for r in await passes(connector)}
    # The failing stream says so; the other stream's report is not lost with it.
    assert reports["Archive"].error == "error: fetch failed"  # IMAPClientError is imaplib's `error`
    assert reports["INBOX"].error is None and reports["INBOX"].remote == 1
    doc = await memory_store.source_status("m")
    assert doc["verified"]["Archive"]["error"] == "error: fetch failed" and doc["verify_failed"] is True

    # The next complete passes (every IDLE wake) do not list the mailbox again...
    for _ in range(3):
        assert await passes(connector) is None
    assert connector.inventoried == ["Archive", "INBOX"]
    # ...nor does a restart (the status document remembers the failed run)...
    again = PassUpkeep(memory_store, StoreSink(memory_store), verify_every=timedelta(hours=24))
    assert await again(connector) is None
    # ...but an hour later it is tried again, not a day later.
    later = now_utc() + upkeep.FAILED_VERIFY_RETRY + timedelta(minutes=1)
    monkeypatch.setattr(upkeep, "now_utc", lambda: later)
    connector.inventory_errors.clear()
    assert [r.error for r in await passes(connector)] == [None, None]
    assert connector.inventoried == ["Archive", "INBOX"] * 2


async def test_a_verify_that_raises_as_a_whole_counts_as_attempted(memory_store, monkeypatch):
    await memory_store.save_checkpoint("m", "INBOX", {"uidvalidity": 1, "last_uid": 9})
    calls = []

    async def down(source):
        calls.append(source)
        raise TimeoutError("timed out")

    monkeypatch.setattr(memory_store, "load_state", down)
    connector = Streams()
    passes = PassUpkeep(memory_store, StoreSink(memory_store), verify_every=timedelta(hours=24))
    with capture_logs() as logs:
        assert await passes(connector) is None
        assert await passes(connector) is None
    assert calls == ["m"]  # once, not at every pass
    (failed,) = [e for e in logs if e["event"] == "upkeep_verify_failed"]
    assert failed["source"] == "m" and failed["error"] == "TimeoutError: timed out"


async def test_a_quarantined_message_whose_folder_was_deleted(dovecot, imap_user, memory_store):
    dovecot.doveadm("mailbox", "create", "-u", imap_user.name, "Projects")
    for i in range(2):
        dovecot.append(imap_user.name, "Projects", message(i))
    box = dovecot.mailbox(imap_user, addresses=[f"{imap_user.name}@ourco.example"], folders=["INBOX", "Projects"])
    settings = settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [box]})
    await Runner(app.build_connectors(settings, None), StoreSink(memory_store), once=True).run()
    uidvalidity = (await memory_store.load_state("m"))["Projects"]["uidvalidity"]
    await memory_store.quarantine_items("m", "Projects", [MalformedItem("died", item_id=1, stream="Projects", detail={"uidvalidity": uidvalidity})])
    assert await memory_store.quarantine_retry_now("m/Projects/1")
    dovecot.doveadm("mailbox", "delete", "-u", imap_user.name, "-s", "Projects")

    (connector,) = app.build_connectors(settings, None)
    passes = PassUpkeep(memory_store, StoreSink(memory_store), verify_every=timedelta(hours=24))
    try:
        reports = {r.stream: r for r in await passes(connector)}
    finally:
        await connector.aclose()
    (e,) = await memory_store.quarantine_list()
    assert e["attempts"] == 1 and e["next_attempt_at"] > now_utc() and "gone" in e["reason"]
    assert reports["INBOX"].error is None and reports["Projects"].error is not None


# -- StreamMissing: the one class by which any connector says a stream is gone (the daemon checks the class, not its name)


class ListDeleted(StreamMissing):
    """What another kind of source (a Twilio list, say) could raise: named nothing like FolderMissing."""


class FolderMissingFromAnotherLibrary(SourceError):
    """Same name as imap's, not a StreamMissing: an unrelated error must not let items go."""


FolderMissingFromAnotherLibrary.__name__ = "FolderMissing"


def test_imap_folder_missing_is_a_stream_missing():
    assert issubclass(FolderMissing, StreamMissing) and issubclass(StreamMissing, SourceError)


async def test_any_stream_missing_marks_the_stream_gone_and_a_look_alike_name_does_not(memory_store):
    await quarantined(memory_store, ["Calls", "Other"])
    connector = Streams(
        refetch_errors={"Calls": ListDeleted("list 'Calls' is gone"), "Other": FolderMissingFromAnotherLibrary("a lock")}
    )
    with capture_logs() as logs:
        await quarantine.retry_due(memory_store, StoreSink(memory_store), connector)
    failed = {e["stream"]: e for e in logs if e["event"] == "quarantine_retry_failed"}
    assert failed["Calls"]["stream_gone"] is True and failed["Other"]["stream_gone"] is False
    assert "gone" in (await entry(memory_store, "Calls"))["reason"]
    assert "gone" not in (await entry(memory_store, "Other"))["reason"]
