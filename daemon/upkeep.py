"""Work that rides on a source's complete pass, in its own worker: quarantine retries and scheduled verify.

It runs after a pass has caught up, on the connection the pass used, so it
never competes with capture for a mailbox and stops with the source. A
failure here is logged and never fails the source.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from commsync.connectors.base import Connector, Inventories

from . import quarantine, verify
from .store import now_utc

log = structlog.get_logger(__name__)


class PassUpkeep:
    """``after_pass`` for the runner: due quarantine retries, then verify when ``verify_every`` has passed."""

    def __init__(self, store: Any, sink: Any, *, verify_every: timedelta | None):
        self.store = store
        self.sink = sink
        self.verify_every = verify_every if verify_every and verify_every > timedelta(0) else None

    async def __call__(self, connector: Connector) -> list[verify.StreamReport] | None:
        """Run what is due; the verify reports when a verify ran."""
        await quarantine.retry_due(self.store, self.sink, connector)
        if self.verify_every is None or not isinstance(connector, Inventories):
            return None
        doc = await self.store.source_status(connector.name) or {}
        last = doc.get("verified_at")
        if isinstance(last, datetime) and now_utc() - _aware(last) < self.verify_every:
            return None
        reports = await verify.verify_source(connector, self.store)
        await verify.save(self.store, connector.name, reports)
        return reports


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
