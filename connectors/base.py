"""The one protocol every source kind implements, its optional capabilities, and its errors.

A connector knows its remote system and nothing else: it reads items newer
than a checkpoint, normalizes them into record dicts and yields them in
batches, each with the checkpoint that follows it. The runner owns retries,
backoff, storing, checkpointing and shutdown; a connector never touches
MongoDB.

Errors tell the runner what to do, by class (as imapclient's typed exceptions
and meltano's do): `CredentialsRefused` backs off for long and parks the
source after a long run of refusals; `TemporarilyUnavailable` backs off and
retries, after ``retry_after`` when the remote system said when;
`StreamMissing` says one stream (a folder) is gone, not the source; a
`MalformedItem` costs one item, which goes to quarantine with its reason.
Anything else is a bug or an unknown failure: logged with its traceback and
retried on the normal backoff.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# -- errors ----------------------------------------------------------------------------

# Error texts in logs, status documents and command output are cut here: long
# enough for a server's reason, short enough never to carry a document.
ERROR_CHARS = 500


def describe(exc: BaseException, limit: int = ERROR_CHARS) -> str:
    """``Type: message`` of an exception, on one line, at most ``limit`` characters."""
    text = str(exc)
    return cut(f"{type(exc).__name__}: {text or type(exc).__name__}", limit)


def cut(text: str, limit: int) -> str:
    """``text`` on one line, ending in "…" when it had to be shortened."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"



class SourceError(Exception):
    """A failure a connector understood; its class says what the runner does about it."""


class CredentialsRefused(SourceError):
    """The remote system refused our credentials (a tagged NO to LOGIN, HTTP 401, OAuth invalid_grant).

    Retrying soon will not help and risks locking the account: the runner backs
    off for minutes to hours and parks the source after ``daemon.park_after``.
    """


class TemporarilyUnavailable(SourceError):
    """The remote system could not be reached or did not answer usefully; trying later may help.

    ``retry_after`` (seconds) is the remote system's own hint, when it gave one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class StreamMissing(SourceError):
    """A stream of the source (an IMAP folder) is not on the remote side any more: deleted or renamed.

    Retrying will not bring it back: the runner reports it as a problem of
    that stream, and quarantined items of it are let go instead of retried.
    """


class MalformedItem(SourceError):
    """One item that cannot be read or normalized; it costs that item only.

    ``item_id`` names it in its stream (an IMAP UID, a Twilio SID) so that it
    can be quarantined, retried and found again.
    """

    def __init__(self, reason: str, *, item_id: Any = None, stream: str | None = None, detail: Mapping[str, Any] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.item_id = item_id
        self.stream = stream
        self.detail = dict(detail or {})


# -- batches -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """Normalized records plus the checkpoint to save once they are stored.

    ``stream`` names the checkpoint inside the source (an IMAP folder, a
    Twilio list). ``drop_sources`` describes source entries this source made
    earlier that are void now (a folder's new UIDVALIDITY), field by field;
    a value may be ``{"$ne": x}``. ``skipped`` counts items left out with a
    logged reason that need no further attention (not sent yet, vanished);
    ``malformed`` holds the items that could not be read, for quarantine.
    ``retired`` says the stream is gone from the remote system (a deleted or
    renamed folder): its checkpoint is forgotten instead of saved.
    ``item_ids`` (from `Refetches.refetch` only) names the item each record
    came from, in order.
    """

    stream: str
    records: list[dict[str, Any]]
    checkpoint: dict[str, Any]
    drop_sources: Mapping[str, Any] | None = None
    skipped: int = 0
    malformed: Sequence[MalformedItem] = field(default_factory=tuple)
    retired: bool = False
    item_ids: Sequence[Any] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class RemoteItem:
    """One item a stream holds on the remote system, as `commsync verify` sees it (no content).

    ``item_id`` locates it in the stream (an IMAP UID, a Twilio SID);
    ``record_id`` is the `_id` its record has, when the connector can tell
    without reading the item (a Message-ID; a SID); ``label`` names it for a
    human; ``excluded`` is the connector's own reason it never becomes a record
    (a call that never started, a leg that belongs to its parent's record).
    """

    item_id: Any
    record_id: Any = None
    label: str | None = None
    excluded: str | None = None


# -- the protocol and its optional capabilities ----------------------------------------------


class Connector(Protocol):
    """A source of records (one configured mailbox or Twilio account)."""

    name: str
    kind: str

    def batches(self, state: Mapping[str, dict[str, Any]]) -> AsyncIterator[Batch]:
        """Yield batches newer than ``state`` (checkpoints by stream)."""
        ...

    async def check(self) -> str:
        """Log in / make one cheap authenticated request; return a short summary."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class WaitsForChange(Protocol):
    """A source that can tell when new items arrive (IMAP IDLE/NOTIFY) instead of being polled."""

    async def wait_for_change(self, timeout: float) -> bool:
        """Return within ``timeout`` seconds; True when something new arrived."""
        ...


@runtime_checkable
class ReportsBacklog(Protocol):
    """A source that knows how many items it found but has not handed out yet."""

    backlog: int | None


@runtime_checkable
class ReportsProblems(Protocol):
    """A source that reports what is wrong without failing (a configured folder that does not exist).

    Keys name the problem (``folder:Sent``), values say it for a human; the
    runner shows them in `commsync status` and the metrics until they clear.
    """

    problems: Mapping[str, str]


@runtime_checkable
class Refetches(Protocol):
    """A source that can read given items again (quarantine retries, `commsync verify --repair`)."""

    def refetch(self, stream: str, checkpoint: Mapping[str, Any] | None, items: Sequence[tuple[Any, Mapping[str, Any]]]) -> AsyncIterator[Batch]:
        """Batches of the items ``(item_id, detail)`` of ``stream``, with ``item_ids`` filled; checkpoints are not moved."""
        ...


@runtime_checkable
class Inventories(Protocol):
    """A source that can list what a stream holds within the range already synced (`commsync verify`)."""

    async def inventory(self, stream: str, checkpoint: Mapping[str, Any]) -> list[RemoteItem]:
        """Every item of ``stream`` up to ``checkpoint``, read cheaply (ids and headers, never bodies)."""
        ...


CheckStep = tuple[str, Callable[[], Awaitable[str]]]


@runtime_checkable
class ChecksInSteps(Protocol):
    """A source whose `commsync check` has several lines (an OAuth2 mailbox: token, then login)."""

    def check_steps(self) -> list[CheckStep]: ...


def check_steps(connector: Connector) -> list[CheckStep]:
    """The steps of `commsync check` for ``connector``: its own, or its one `check`."""
    if isinstance(connector, ChecksInSteps):
        return connector.check_steps()
    return [("", connector.check)]


def backlog_of(connector: Connector) -> int | None:
    """Items found but not yet handed out, when the connector knows."""
    return connector.backlog if isinstance(connector, ReportsBacklog) else None
