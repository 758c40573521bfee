"""The window one pass over a Twilio list reads, and the checkpoint it leaves. Pure.

Lists are newest first and filter by whole UTC days. A pass reads from now
back to ``start`` (cursor - lookback, never before ``since``); the day
filter bounds the query and the first item older than ``start`` ends it.

Checkpoint: ``{"cursor": T}`` means every item that started (was sent) at
or before T has been stored in its final state, up to changes that
``lookback`` re-reads. While a pass runs, each stored page also saves
``pass: {top, floor, below, hold}``: items newer than ``floor`` are stored,
so an interrupted pass resumes there instead of reading a long backfill
again. ``below`` (at or above ``floor``) is where the resumed query starts:
legs read but still waiting for their parent call are read again. ``cursor``
only moves when a pass completes, to the newest item read, but never past a
call that has not ended (``hold``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog

from .twilio_records import Call

log = structlog.get_logger(__name__)

# Twilio ends every call after at most 24 hours (the <Dial>/Calls time limit), so a
# call reported open for longer is stuck and must not hold the cursor for ever.
MAX_CALL = timedelta(hours=24)
# A saved cursor further ahead of the clock than this cannot be right (a database restored
# from another system, a clock that was wrong): new items would fall before it for ever.
MAX_CURSOR_AHEAD = timedelta(hours=1)


@dataclass
class Window:
    """One pass over one list, newest first: what to read and what may be checkpointed.

    ``start`` is the oldest time read (cursor - lookback, never before
    ``since``). When resuming an interrupted pass, items newer than
    ``floor`` were stored already and the query reaches up to ``below``.
    """

    cursor: datetime | None
    start: datetime | None
    below: datetime | None = None
    floor: datetime | None = None
    top: datetime | None = None
    hold: datetime | None = None
    oldest: datetime | None = None
    # The saved cursor, when it lay in the future and the window starts from the beginning instead.
    discarded: datetime | None = None

    @classmethod
    def open(
        cls, checkpoint: Mapping[str, Any] | None, *, since: date | None, lookback: timedelta, now: datetime | None = None
    ) -> Window:
        checkpoint = checkpoint or {}
        cursor = _iso(checkpoint.get("cursor"))
        discarded = None
        if cursor is not None and now is not None and cursor > now + MAX_CURSOR_AHEAD:
            discarded, cursor, checkpoint = cursor, None, {}
        floor = datetime(since.year, since.month, since.day, tzinfo=UTC) if since else None
        start = cursor - lookback if cursor else floor
        if start is not None and floor is not None:
            start = max(start, floor)
        resume = checkpoint.get("pass") or {}
        below = _iso(resume.get("below"))
        floor = _iso(resume.get("floor")) or below
        if below is None or floor is None or floor > below:
            below = floor = None
        return cls(cursor, start, below, floor, _iso(resume.get("top")), _iso(resume.get("hold")), discarded=discarded)

    def day_filters(self, reach: timedelta = timedelta(0)) -> tuple[str | None, str | None]:
        """(on or after day, before day) for the list query: Twilio filters by whole UTC days.

        When resuming, the upper bound is the day after ``below + reach``,
        which includes all of that day whether the list reads ``<`` as
        "before" (Calls) or "on and before" (Messages). ``reach`` lets items
        that belong to re-read ones come back too (a call's legs start up to
        a call's length after it).
        """
        after = self.start.date().isoformat() if self.start else None
        before = ((self.below + reach).date() + timedelta(days=1)).isoformat() if self.below else None
        return after, before

    def place(self, t: datetime) -> str:
        """Where an item of time ``t`` falls.

        "done": stored before the pass was interrupted; "older": past the
        window; "edge": exactly at the resume point, where a page may have
        ended between items of the same second, so it may or may not have
        been stored; "read": new to this pass.
        """
        if self.floor is not None and t > self.floor:
            return "done"
        if self.start is not None and t < self.start:
            return "older"
        if self.top is None or t > self.top:
            self.top = t
        if self.oldest is None or t < self.oldest:
            self.oldest = t
        return "edge" if t == self.floor else "read"

    def hold_at(self, t: datetime) -> bool:
        """Keep the cursor at or below ``t`` (an open call); False when the call is too old to be real."""
        if self.top is not None and t < self.top - MAX_CALL:
            return False
        self.hold = t if self.hold is None else min(self.hold, t)
        return True

    def progress(self, pending: datetime | None = None) -> dict[str, Any]:
        """Checkpoint after a stored page: the cursor unchanged, the pass resumable below what is stored.

        ``pending`` is the newest item read but not stored yet (a leg whose
        parent call is still to come): the resumed query reaches up to it.
        """
        floor = self.oldest if self.oldest is not None else self.floor
        below = floor if pending is None or floor is None else max(pending, floor)
        return {
            "cursor": _str(self.cursor),
            "pass": {"top": _str(self.top), "floor": _str(floor), "below": _str(below), "hold": _str(self.hold)},
        }

    def finished(self) -> dict[str, Any]:
        """Checkpoint after the whole window is stored: the newest item, held back by open calls."""
        cursor = self.cursor
        if self.top is not None:
            reached = self.top if self.hold is None else min(self.top, self.hold)
            cursor = reached if cursor is None else max(cursor, reached)
        return {"cursor": _str(cursor)}


def _iso(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            log.warning("checkpoint_unreadable", value=value[:40])
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _str(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class Conversation:
    """A parent call, its child legs, and recordings found for it outside the feed."""

    root: Call
    legs: list[Call]
    recordings: list[Mapping[str, Any]] = field(default_factory=list)
    # Read at a resume point: legs newer than it were not read again, so they must be listed.
    incomplete: bool = False

    @property
    def ended(self) -> bool:
        return self.root.final and all(leg.final for leg in self.legs)

    def sids(self) -> list[str]:
        return [self.root.sid, *(leg.sid for leg in self.legs)]


class LegGroups:
    """Child legs read before their parent (lists are newest first and legs start after their parent)."""

    def __init__(self) -> None:
        self._by_parent: dict[str, list[Call]] = {}

    def add(self, leg: Call) -> None:
        # A leg's own legs (rare) belong to the same conversation.
        nested = self._by_parent.pop(leg.sid, [])
        self._by_parent.setdefault(leg.parent or "", []).extend([leg, *nested])

    def newest(self) -> datetime | None:
        """The newest leg still waiting for its parent."""
        times = [leg.start for legs in self._by_parent.values() for leg in legs if leg.start]
        return max(times) if times else None

    def take(self, parent_sid: str) -> list[Call]:
        return self._by_parent.pop(parent_sid, [])

    def orphans(self) -> dict[str, list[Call]]:
        """Legs whose parent was not read in this pass (it started before the window)."""
        out, self._by_parent = self._by_parent, {}
        return out

    def sids(self) -> set[str]:
        return {leg.sid for legs in self._by_parent.values() for leg in legs}
