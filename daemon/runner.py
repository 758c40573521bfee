"""The runner: one supervised task per source.

It owns what connectors must not: storing each batch, saving its checkpoint
only after the batch is stored, retries with backoff and jitter, and a
shutdown that finishes the batch in hand.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TextIO

import structlog

from commsync.connectors.base import AuthError, Batch, Connector

log = structlog.get_logger(__name__)


class Sink(Protocol):
    """Where batches go: the store, or stdout for a dry run."""

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]: ...

    async def write(self, source: str, batch: Batch) -> None: ...

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None: ...


class StoreSink:
    """Batches into MongoDB: records, then histories; checkpoints on request."""

    def __init__(self, store: Any):
        self.store = store

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]:
        return await self.store.load_state(source)

    async def write(self, source: str, batch: Batch) -> None:
        result = await self.store.write_batch(batch.records, drop_sources=batch.drop_sources)
        log.info(
            "batch_stored",
            source=source,
            stream=batch.stream,
            records=result.records,
            new=result.inserted,
            customers=result.customers,
            skipped=batch.skipped,
            round_trips=result.round_trips,
        )

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None:
        await self.store.save_checkpoint(source, stream, checkpoint)


class DryRunSink:
    """Prints each record as one JSON line; keeps no state, so every pass is a full one."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.count = 0

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]:
        return {}

    async def write(self, source: str, batch: Batch) -> None:
        lines = [json.dumps(r, default=_json_default, ensure_ascii=False) for r in batch.records]
        if lines:
            self.out.write("\n".join(lines) + "\n")
        self.count += len(lines)

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None:
        return None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@dataclass
class SourceStatus:
    name: str
    kind: str
    passes: int = 0
    records: int = 0
    failures: int = 0
    last_error: str | None = None
    last_success: datetime | None = None
    history: list[str] = field(default_factory=list)


class Runner:
    """Supervises one task per connector until stopped (or for one pass with ``once``)."""

    def __init__(
        self,
        connectors: Sequence[Connector],
        sink: Sink,
        *,
        once: bool = False,
        poll_interval: timedelta = timedelta(minutes=1),
        intervals: Mapping[str, timedelta] | None = None,
        backoff_max: timedelta = timedelta(minutes=10),
    ):
        self.connectors = list(connectors)
        self.sink = sink
        self.once = once
        self.poll_interval = poll_interval
        self.intervals = dict(intervals or {})
        self.backoff_max = backoff_max
        self.status = {c.name: SourceStatus(c.name, c.kind) for c in self.connectors}
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask every worker to finish the batch in hand and return."""
        if not self._stop.is_set():
            log.info("stopping")
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> bool:
        """Run every source; True when none failed on its last attempt."""
        try:
            await asyncio.gather(*(self._supervise(c) for c in self.connectors))
        finally:
            await asyncio.gather(*(c.aclose() for c in self.connectors), return_exceptions=True)
        return all(s.last_error is None for s in self.status.values())

    async def _supervise(self, connector: Connector) -> None:
        status = self.status[connector.name]
        bound = log.bind(source=connector.name, kind=connector.kind)
        while not self.stopping:
            try:
                stored = await self.run_pass(connector)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status.failures += 1
                status.last_error = _describe(exc)
                if isinstance(exc, AuthError):
                    bound.error("source_failed", error=status.last_error, failures=status.failures, retry="after backoff")
                else:
                    bound.exception("source_failed", error=status.last_error, failures=status.failures)
                if self.once:
                    return
                await self._sleep(self._backoff(status.failures))
                continue
            status.passes += 1
            status.records += stored
            status.failures = 0
            status.last_error = None
            status.last_success = datetime.now().astimezone()
            if self.once:
                return
            await self._sleep(self.intervals.get(connector.name, self.poll_interval).total_seconds())

    async def run_pass(self, connector: Connector) -> int:
        """Read every new batch of one source; store each, then checkpoint it. Returns records stored."""
        stored = 0
        state = await self.sink.load_state(connector.name)
        batches = connector.batches(state)
        try:
            while not self.stopping:
                batch = await self._next(batches)
                if batch is None:
                    break
                # Never interrupted by a stop: a batch in hand is stored and checkpointed.
                await self.sink.write(connector.name, batch)
                await self.sink.save_checkpoint(connector.name, batch.stream, batch.checkpoint)
                stored += len(batch.records)
        finally:
            await batches.aclose()
        return stored

    async def _next(self, batches: Any) -> Batch | None:
        """The next batch, or None when the source is done or a stop was asked for."""
        step = asyncio.ensure_future(anext(batches))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
            return None
        try:
            return step.result()
        except StopAsyncIteration:
            return None

    def _backoff(self, failures: int) -> float:
        # Exponential with full jitter: failing sources do not retry in lockstep.
        ceiling = min(self.backoff_max.total_seconds(), 2.0 ** min(failures, 20))
        return random.uniform(ceiling / 2, ceiling)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]
