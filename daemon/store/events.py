"""Change streams on `records`: what `commsync watch` follows.

A change stream needs a replica set (one member is enough); ``memory://``
(mongomock) and a standalone mongod have none. Driver errors are translated
here into the few cases the command acts on: no change streams, a resume point
the server no longer has, the server gone for a while (reopen from the last
token), and the collection dropped or renamed.

Resume tokens are opaque to everything outside this module: they travel as
JSON values (`token_json` / `token_from_json`, canonical extended JSON).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymongo.errors
from bson import json_util

from .base import StoreBase

# The server's operation, as a consumer sees it: a replace is an update (the record is given whole anyway).
_OPERATIONS = {"insert": "insert", "update": "update", "replace": "update", "delete": "delete"}
# The stream is over: the collection was dropped or renamed, or the database dropped.
_ENDS = frozenset({"invalidate"})

# IllegalOperation on a standalone mongod; unknown stage on a server too old for change streams.
_UNSUPPORTED = frozenset({40573, 40324})
# ChangeStreamHistoryLost (the oplog rolled over), InvalidResumeToken, ChangeStreamFatalError,
# and the parse errors a mangled token gets (FailedToParse, BadValue).
_RESUME_LOST = frozenset({286, 260, 280, 9, 2})


class ChangeStreamsUnsupported(Exception):
    """The server (or the memory:// double) has no change streams: it is not a replica set."""


class ResumePointLost(Exception):
    """The server cannot resume from the given token: it no longer has that history, or the token is not one of its own."""


class ChangesInterrupted(Exception):
    """The server went away (or stopped answering); reopen from the last token."""


class RecordsInvalidated(Exception):
    """The `records` collection was dropped or renamed (or its database dropped): the stream cannot go on."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change of one record."""

    operation: str  # insert | update | delete
    record_id: Any
    at: datetime  # the change's cluster time (UTC, whole seconds)
    record: dict[str, Any] | None  # the record as it is now; None for a delete, or when it is gone since


def token_json(token: Mapping[str, Any]) -> Any:
    """A resume token as plain JSON values (canonical extended JSON), to keep in a file."""
    return json.loads(json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS))


def token_from_json(value: Any) -> dict[str, Any]:
    """The resume token `token_json` gave; ValueError when ``value`` is none."""
    try:
        token = json_util.loads(json.dumps(value))
    except Exception as exc:  # json_util raises ValueError, TypeError or bson errors alike
        raise ValueError(f"not a resume token: {exc}") from None
    if not isinstance(token, dict) or not token:
        raise ValueError("not a resume token: expected a non-empty document")
    return token


@contextmanager
def _translated(resuming: bool) -> Iterator[None]:
    try:
        yield
    except pymongo.errors.OperationFailure as exc:
        if exc.code in _UNSUPPORTED:
            raise ChangeStreamsUnsupported(exc.details.get("errmsg") if exc.details else str(exc)) from exc
        if exc.code in _RESUME_LOST and (resuming or exc.code == 286):
            raise ResumePointLost(f"{exc.details.get('codeName', exc.code) if exc.details else exc.code}: {_message(exc)}") from exc
        if exc.has_error_label("ResumableChangeStreamError"):
            raise ChangesInterrupted(_message(exc)) from exc
        raise
    except pymongo.errors.ConnectionFailure as exc:  # includes AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
        raise ChangesInterrupted(f"{type(exc).__name__}: {_message(exc)}") from exc


def _message(exc: pymongo.errors.PyMongoError) -> str:
    details = getattr(exc, "details", None)
    return str(details.get("errmsg")) if isinstance(details, Mapping) and details.get("errmsg") else str(exc)


class RecordChanges:
    """An open change stream on `records`; `next()` gives the next change, or None after a quiet wait."""

    def __init__(self, stream: Any, resuming: bool):
        self._stream = stream
        self._resuming = resuming

    @property
    def token(self) -> dict[str, Any] | None:
        """Where to resume to see nothing twice: after the last change `next()` returned (or later, when nothing else came)."""
        return self._stream.resume_token

    async def next(self) -> Change | None:
        """The next change of a record; None when there was none within the stream's wait, or the event concerned none."""
        with _translated(self._resuming):
            event = await self._stream.try_next()
        if event is None:
            return None
        # A resumed stream that delivered an event is past the token it was opened with.
        self._resuming = False
        kind = event.get("operationType")
        if kind in _ENDS:
            raise RecordsInvalidated(f"the change stream ended ({kind}): the records collection was dropped or renamed")
        operation = _OPERATIONS.get(kind)
        if operation is None:
            return None  # drop, rename, dropDatabase: the invalidate event follows
        return Change(
            operation=operation,
            record_id=event["documentKey"]["_id"],
            at=event["clusterTime"].as_datetime(),
            record=event.get("fullDocument") if operation != "delete" else None,
        )


class EventsMixin(StoreBase):
    """Change streams on `records`."""

    @asynccontextmanager
    async def record_changes(self, resume_after: Mapping[str, Any] | None = None, *, wait: float = 0.5) -> AsyncIterator[RecordChanges]:
        """Follow inserts, updates and deletes of records, after ``resume_after`` (None: from now on).

        Each change carries the record as it is when the change is read
        (``updateLookup``). `next()` waits at most ``wait`` seconds for one.
        Raises `ChangeStreamsUnsupported`, `ResumePointLost`, `ChangesInterrupted`
        (on opening or on `next()`) and `RecordsInvalidated` (on `next()`).
        """
        if self.memory:
            raise ChangeStreamsUnsupported("memory:// (mongomock) has no change streams")
        resuming = resume_after is not None
        stream = self.records.watch(
            full_document="updateLookup", resume_after=dict(resume_after) if resuming else None, max_await_time_ms=max(1, int(wait * 1000))
        )
        with _translated(resuming):
            await stream.__aenter__()
        try:
            yield RecordChanges(stream, resuming)
        finally:
            try:
                await stream.close()
            except pymongo.errors.PyMongoError:
                pass  # the server is gone: nothing to close there
