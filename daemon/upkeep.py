"""Work that rides on a source's complete pass, in its own worker: quarantine retries and scheduled verify.

It runs after a pass has caught up, on the connection the pass used, so it
never competes with capture for a mailbox and stops with the source. A
failure here is logged and never fails the source.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from commsync.connectors.base import Connector, Inventories

from . import quarantine, verify
from .store import now_utc

log = structlog.get_logger(__name__)


# Which sources have quarantine retries due is asked for all sources at once, at most this
# often: a query per source and pass cost hundreds of mailboxes a good part of their quiet
# CPU, and retries are minutes apart anyway.
DUE_REFRESH_S = 60.0


class PassUpkeep:
    """``after_pass`` for the runner: due quarantine retries, then verify when ``verify_every`` has passed.

    A pass that has nothing due asks MongoDB nothing: the sources with due
    retries are looked up once a minute for all, and the last verify of each
    source is remembered once read or done (only ever moved later, so a verify
    it deems not due is not due).
    """

    def __init__(self, store: Any, sink: Any, *, verify_every: timedelta | None):
        self.store = store
        self.sink = sink
        self.verify_every = verify_every if verify_every and verify_every > timedelta(0) else None
        self._due: set[str] = set()
        self._due_at = -DUE_REFRESH_S
        self._verified: dict[str, datetime] = {}

    async def __call__(self, connector: Connector) -> list[verify.StreamReport] | None:
        """Run what is due; the verify reports when a verify ran."""
        if await self._retries_due(connector.name):
            await quarantine.retry_due(self.store, self.sink, connector)
            self._due.discard(connector.name)
        if self.verify_every is None or not isinstance(connector, Inventories):
            return None
        if not self._verify_due(connector.name):
            return None
        doc = await self.store.source_status(connector.name) or {}
        last = doc.get("verified_at")
        if isinstance(last, datetime):
            self._verified[connector.name] = _aware(last)
            if not self._verify_due(connector.name):
                return None
        reports = await verify.verify_source(connector, self.store)
        await verify.save(self.store, connector.name, reports)
        self._verified[connector.name] = now_utc()
        return reports

    async def _retries_due(self, source: str) -> bool:
        now = time.monotonic()
        if now - self._due_at >= DUE_REFRESH_S:
            self._due = await self.store.quarantine_due_sources()
            self._due_at = now
        return source in self._due

    def _verify_due(self, source: str) -> bool:
        last = self._verified.get(source)
        return last is None or now_utc() - last >= self.verify_every


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
