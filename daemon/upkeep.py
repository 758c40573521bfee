"""Work that rides on a source's complete pass, in its own worker: quarantine retries and scheduled verify.

It runs after a pass has caught up, on the connection the pass used, so it
never competes with capture for a mailbox and stops with the source. A
failure here is logged and never fails the source, and a failing retry never
keeps the verify from running (nor the other way round).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import structlog

from commsync.connectors.base import Connector, Inventories

from . import quarantine, verify
from .clock import aware, now_utc
from .text import describe

log = structlog.get_logger(__name__)


# Which sources have quarantine retries due is asked for all sources at once, at most this
# often: a query per source and pass cost hundreds of mailboxes a good part of their quiet
# CPU, and retries are minutes apart anyway.
DUE_REFRESH_S = 60.0
# A verify that failed (raised, or a stream of it did) is tried again after this, or after
# verify_every when that is shorter: soon enough to see a fix the same day, seldom enough
# that a broken mailbox is not listed in full at every IDLE wake.
FAILED_VERIFY_RETRY = timedelta(hours=1)


class PassUpkeep:
    """``after_pass`` for the runner: due quarantine retries, then verify when ``verify_every`` has passed.

    A pass that has nothing due asks MongoDB nothing: the sources with due
    retries are looked up once a minute for all, and when each source's next
    verify is due is remembered once read or done. A verify counts as
    attempted before it runs (in memory): one that fails, or one with a stream
    that failed, is tried again after ``FAILED_VERIFY_RETRY`` (or
    ``verify_every`` when shorter); one that succeeds after ``verify_every``.
    A verify cut short by a stop or a lost lease waits the same as a failed one.
    A run with a failed stream says so in the status document
    (``verify_failed``), so that a restart keeps the shorter wait.
    """

    def __init__(self, store: Any, sink: Any, *, verify_every: timedelta | None):
        self.store = store
        self.sink = sink
        self.verify_every = verify_every if verify_every and verify_every > timedelta(0) else None
        self._due: set[str] = set()
        self._due_at = -DUE_REFRESH_S
        # source -> when its next verify is due (unknown until read from its status or done).
        self._next_verify: dict[str, datetime] = {}

    async def __call__(self, connector: Connector) -> list[verify.StreamReport] | None:
        """Run what is due; the verify reports when a verify ran."""
        try:
            await self._retry(connector)
        except Exception as exc:
            log.warning("upkeep_retry_failed", source=connector.name, error=describe(exc))
        if self.verify_every is None or not isinstance(connector, Inventories):
            return None
        try:
            return await self._verify(connector)
        except Exception as exc:
            log.warning("upkeep_verify_failed", source=connector.name, error=describe(exc))
            return None

    async def _retry(self, connector: Connector) -> None:
        if not await self._retries_due(connector.name):
            return
        try:
            await quarantine.retry_due(self.store, self.sink, connector)
        finally:
            # Failed or not, the next look at what is due decides (at most once a minute).
            self._due.discard(connector.name)

    async def _verify(self, connector: Connector) -> list[verify.StreamReport] | None:
        name = connector.name
        if not self._verify_due(name):
            return None
        now = now_utc()
        # Attempted from now on, whatever happens next (a fetch error, a timeout, MongoDB).
        self._next_verify[name] = now + self._retry_after
        doc = await self.store.source_status(name) or {}
        last = aware(doc.get("verified_at"))
        if last is not None:
            # Verified since (by us before a restart, or by another instance)?
            due = last + (self._retry_after if doc.get("verify_failed") else self.verify_every)
            if due > now:
                self._next_verify[name] = due
                return None
        reports = await verify.verify_source(connector, self.store)
        await verify.save(self.store, name, reports)
        if all(r.error is None for r in reports):
            self._next_verify[name] = now_utc() + self.verify_every
        else:
            log.warning("upkeep_verify_incomplete", source=name, failed=[r.stream for r in reports if r.error is not None])
        return reports

    @property
    def _retry_after(self) -> timedelta:
        assert self.verify_every is not None
        return min(FAILED_VERIFY_RETRY, self.verify_every)

    async def _retries_due(self, source: str) -> bool:
        now = time.monotonic()
        if now - self._due_at >= DUE_REFRESH_S:
            self._due = await self.store.quarantine_due_sources()
            self._due_at = now
        return source in self._due

    def _verify_due(self, source: str) -> bool:
        when = self._next_verify.get(source)
        return when is None or now_utc() >= when
