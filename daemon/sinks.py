"""Where the runner's batches go: the store, or stdout for a dry run."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any, Protocol, TextIO, runtime_checkable

import structlog

from commsync.connectors.base import Batch

from .text import json_default

log = structlog.get_logger(__name__)


class Sink(Protocol):
    """Stores batches and keeps checkpoints."""

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]: ...

    async def write(self, source: str, batch: Batch) -> Any: ...

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None: ...

    async def forget_checkpoint(self, source: str, stream: str) -> None: ...


@runtime_checkable
class KeepsStatus(Protocol):
    """A sink that keeps each source's status where `commsync status` reads it."""

    async def save_source_status(self, source: str, fields: Mapping[str, Any]) -> None: ...

    async def load_source_status(self, source: str) -> dict[str, Any] | None: ...

    async def save_error(self, source: str, error: str, at: Any) -> None: ...


class StoreSink:
    """Batches into MongoDB: records, then histories, and what could not be read into quarantine."""

    def __init__(self, store: Any):
        self.store = store

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]:
        return await self.store.load_state(source)

    async def write(self, source: str, batch: Batch) -> Any:
        """Store the batch; returns the store's BatchResult."""
        result = await self.store.write_batch(
            batch.records, drop_sources=batch.drop_sources, source=source, stream=batch.stream, malformed=batch.malformed
        )
        log.info(
            "batch_stored",
            source=source,
            stream=batch.stream,
            records=result.records,
            new=result.inserted,
            customers=result.customers,
            skipped=batch.skipped or None,
            quarantined=result.quarantined or None,
            not_captured=dict(result.not_captured) or None,
        )
        return result

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None:
        await self.store.save_checkpoint(source, stream, checkpoint)
        log.debug("checkpoint_saved", source=source, stream=stream, checkpoint=dict(checkpoint))

    async def forget_checkpoint(self, source: str, stream: str) -> None:
        await self.store.delete_checkpoint(source, stream)
        log.info("checkpoint_retired", source=source, stream=stream)

    async def save_source_status(self, source: str, fields: Mapping[str, Any]) -> None:
        await self.store.save_source_status(source, fields)

    async def load_source_status(self, source: str) -> dict[str, Any] | None:
        return await self.store.source_status(source)

    async def save_error(self, source: str, error: str, at: Any) -> None:
        await self.store.save_source_error(source, error, at)


class DryRunSink:
    """Prints each record as one JSON line; keeps no state, so every pass is a full one."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.count = 0

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]:
        return {}

    async def write(self, source: str, batch: Batch) -> None:
        lines = [json.dumps(r, default=json_default, ensure_ascii=False) for r in batch.records]
        if lines:
            self.out.write("\n".join(lines) + "\n")
        self.count += len(lines)
        for item in batch.malformed:
            log.warning("item_not_readable", source=source, stream=batch.stream, item=item.item_id, reason=item.reason)

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None:
        return None

    async def forget_checkpoint(self, source: str, stream: str) -> None:
        return None
