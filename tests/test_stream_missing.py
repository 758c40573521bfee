"""`StreamMissing` is the one class by which any connector says a stream is gone: the daemon checks the class, not its name."""

from __future__ import annotations

from structlog.testing import capture_logs
from test_upkeep_failures import Streams, entry, quarantined

from commsync.connectors.base import SourceError, StreamMissing
from commsync.connectors.imap import FolderMissing
from commsync.daemon import quarantine
from commsync.daemon.runner import StoreSink


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
