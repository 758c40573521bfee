"""The runner: one supervised task per source.

It owns what connectors must not: storing each batch, saving its checkpoint
only after the batch is stored, retries with backoff and jitter, waiting
between passes (or for the connector's push, e.g. IMAP IDLE), leases when
several instances share the sources, each source's status, and a shutdown
that finishes the batch in hand.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TextIO

import structlog

from commsync.connectors.base import AuthError, Batch, Connector

log = structlog.get_logger(__name__)

# How often, at most, a source's status document is written between passes.
STATUS_EVERY_S = 5.0


class Sink(Protocol):
    """Where batches go: the store, or stdout for a dry run.

    A sink may also have ``save_source_status(source, fields)``; the runner
    then keeps each source's status there.
    """

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]: ...

    async def write(self, source: str, batch: Batch) -> None: ...

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None: ...


class StoreSink:
    """Batches into MongoDB: records, then histories; checkpoints on request."""

    def __init__(self, store: Any):
        self.store = store

    async def load_state(self, source: str) -> dict[str, dict[str, Any]]:
        return await self.store.load_state(source)

    async def write(self, source: str, batch: Batch) -> Any:
        """Store the batch; returns the store's BatchResult."""
        result = await self.store.write_batch(batch.records, drop_sources=batch.drop_sources)
        log.info(
            "batch_stored",
            source=source,
            stream=batch.stream,
            records=result.records,
            new=result.inserted,
            customers=result.customers,
            skipped=batch.skipped,
            not_captured=dict(result.not_captured) or None,
            round_trips=result.round_trips,
        )
        return result

    async def save_checkpoint(self, source: str, stream: str, checkpoint: Mapping[str, Any]) -> None:
        await self.store.save_checkpoint(source, stream, checkpoint)
        log.debug("checkpoint_saved", source=source, stream=stream, checkpoint=dict(checkpoint))

    async def save_source_status(self, source: str, fields: Mapping[str, Any]) -> None:
        await self.store.save_source_status(source, fields)


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
    last_error_at: datetime | None = None
    last_success: datetime | None = None
    last_batch_at: datetime | None = None
    backlog: int | None = None
    # starting | waiting for lease | syncing | waiting | backoff | stopped
    state: str = "starting"
    history: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Worker:
    connector: Connector
    interval: float
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None
    next_poll: float = 0.0
    status_written: float = 0.0
    started: bool = False
    # Whether the last pass read its source to the end (not halted, no lease lost).
    complete: bool = False

    @property
    def name(self) -> str:
        return self.connector.name


class Runner:
    """Supervises one task per connector until stopped (or for one pass with ``once``).

    Sources can be added and removed while it runs (a config reload). With
    ``leases`` (a LeaseKeeper) a source is worked only while this instance
    holds its lease. ``listeners`` get optional callbacks: ``batch_stored(source,
    batch, seconds)``, ``pass_succeeded(status)``, ``pass_failed(status)``,
    ``source_removed(name)``.
    """

    def __init__(
        self,
        connectors: Sequence[Connector],
        sink: Sink,
        *,
        once: bool = False,
        poll_interval: timedelta = timedelta(minutes=1),
        intervals: Mapping[str, timedelta] | None = None,
        backoff_max: timedelta = timedelta(minutes=10),
        leases: Any = None,
        listeners: Sequence[Any] = (),
    ):
        self.sink = sink
        self.once = once
        self.poll_interval = poll_interval
        self.intervals = dict(intervals or {})
        self.backoff_max = backoff_max
        self.leases = leases
        self.listeners = list(listeners)
        self.status: dict[str, SourceStatus] = {}
        self._workers: dict[str, _Worker] = {}
        self._stop = asyncio.Event()
        self._running = False
        for connector in connectors:
            self.add(connector)

    @property
    def owner(self) -> str | None:
        return getattr(self.leases, "owner", None)

    @property
    def running(self) -> bool:
        return self._running and not self.stopping

    @property
    def sources(self) -> list[str]:
        return list(self._workers)

    def connector(self, name: str) -> Connector:
        return self._workers[name].connector

    def stop(self) -> None:
        """Ask every worker to finish the batch in hand and return."""
        if not self._stop.is_set():
            log.info("stopping")
        self._stop.set()
        for worker in self._workers.values():
            worker.stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- sources coming and going ---------------------------------------------------

    def add(self, connector: Connector, interval: timedelta | None = None) -> None:
        """Supervise ``connector`` too (from now, if running)."""
        if connector.name in self._workers:
            raise ValueError(f"source {connector.name!r} is already running")
        every = interval or self.intervals.get(connector.name) or self.poll_interval
        worker = _Worker(connector, every.total_seconds(), asyncio.Event())
        if self.stopping:
            worker.stop.set()
        self._workers[connector.name] = worker
        self.status[connector.name] = SourceStatus(connector.name, connector.kind)
        if self.leases is not None:
            self.leases.want(connector.name)
        if self._running:
            self._start(worker)

    async def remove(self, name: str) -> None:
        """Stop ``name`` cleanly (the batch in hand is stored), close it and forget it."""
        worker = self._workers.get(name)
        if worker is None:
            return
        worker.stop.set()
        if worker.task is not None:
            await asyncio.gather(worker.task, return_exceptions=True)
        else:
            await _quiet_close(worker.connector)
        del self._workers[name]
        self.status.pop(name, None)
        if self.leases is not None:
            await self.leases.unwant(name)
        self._notify("source_removed", name)
        log.info("source_removed", source=name)

    def _start(self, worker: _Worker) -> None:
        worker.task = asyncio.create_task(self._supervise(worker), name=f"source-{worker.name}")

    # -- running ----------------------------------------------------------------------

    async def run(self) -> bool:
        """Run every source; True when none failed on its last attempt."""
        self._running = True
        keeper = asyncio.create_task(self.leases.run(), name="leases") if self.leases is not None else None
        for worker in self._workers.values():
            self._start(worker)
        clean = False
        try:
            if not self.once:
                await self._stop.wait()
            # Workers added while we wait are in the dict too; keep gathering until none is left running.
            while pending := [w.task for w in self._workers.values() if w.task is not None and not w.task.done()]:
                await asyncio.gather(*pending)
            clean = True
        finally:
            self._running = False
            if not clean:
                # Cancelled (the process is dying): leases are left to expire, like a crash.
                for worker in self._workers.values():
                    if worker.task is not None:
                        worker.task.cancel()
                await asyncio.gather(*(w.task for w in self._workers.values() if w.task), return_exceptions=True)
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                if clean:
                    await self.leases.release_all()
        return all(s.last_error is None for s in self.status.values())

    async def _supervise(self, worker: _Worker) -> None:
        try:
            crashes = 0
            while True:
                try:
                    await self._work(worker)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug outside a pass: logged with its traceback, retried, and the others go on.
                    crashes += 1
                    log.exception("worker_crashed", source=worker.name, crashes=crashes)
                    if self.once:
                        return
                    await self._until(worker, asyncio.sleep(self._backoff(crashes)), revocable=False)
                    if worker.stop.is_set():
                        return
        finally:
            self.status[worker.name].state = "stopped"
            await _quiet_close(worker.connector)

    async def _work(self, worker: _Worker) -> None:
        connector = worker.connector
        status = self.status[worker.name]
        bound = log.bind(source=connector.name, kind=connector.kind)
        leases = self.leases
        worker.next_poll = time.monotonic() + worker.interval
        while not worker.stop.is_set():
            if leases is not None and not leases.holds(worker.name):
                status.state = "waiting for lease"
                await self._until(worker, leases.granted(worker.name).wait(), revocable=False)
                if worker.stop.is_set():
                    break
                if not leases.holds(worker.name):
                    # Granted, then lost before we got going: start over.
                    await leases.give_back(worker.name)
                    continue
            if not worker.started:
                worker.started = True
                bound.info("source_started", owner=self.owner)
            status.state = "syncing"
            try:
                stored = await self.run_pass(connector, worker)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status.failures += 1
                status.last_error = _describe(exc)
                status.last_error_at = _now()
                status.state = "backoff"
                if isinstance(exc, AuthError):
                    bound.error("source_failed", error=status.last_error, failures=status.failures, retry="after backoff")
                else:
                    bound.exception("source_failed", error=status.last_error, failures=status.failures)
                self._notify("pass_failed", status)
                await self._save_status(worker, force=True)
                if self.once:
                    return
                await self._until(worker, asyncio.sleep(self._backoff(status.failures)))
            else:
                status.records += stored
                if worker.complete:
                    # A pass cut short (a stop, a lost lease) is no success: the source is not caught up.
                    status.passes += 1
                    status.failures = 0
                    status.last_error = None
                    status.last_success = _now()
                    status.backlog = 0
                status.state = "waiting"
                self._notify("pass_succeeded", status)
                await self._save_status(worker, force=True)
                if self.once:
                    return
                await self._wait_between_passes(worker)
            if leases is not None and (self._revoked(worker) or not leases.holds(worker.name)) and not worker.stop.is_set():
                await leases.give_back(worker.name)
                worker.started = False

    async def run_pass(self, connector: Connector, worker: _Worker | None = None) -> int:
        """Read every new batch of one source; store each, then checkpoint it. Returns records stored."""
        worker = worker or self._workers.get(connector.name) or _Worker(connector, 0, self._stop)
        worker.complete = False
        stored = 0
        state = await self.sink.load_state(connector.name)
        batches = connector.batches(state)
        try:
            while not self._halted(worker):
                batch = await self._next(batches, worker)
                if batch is None:
                    worker.complete = not self._halted(worker)
                    break
                if self.leases is not None and not self.leases.holds(connector.name):
                    # Our lease ran out (a stall): another instance may own the source
                    # now, so this batch is left for whoever reads it next.
                    log.warning("batch_dropped_lease_expired", source=connector.name, stream=batch.stream)
                    break
                # Never interrupted by a stop: a batch in hand is stored and checkpointed.
                started = time.monotonic()
                await self.sink.write(connector.name, batch)
                if self.leases is not None and not self.leases.holds(connector.name):
                    # The write outlived the lease: the records are in (upserts, harmless twice),
                    # but the checkpoint is the new owner's to move now, never ours to move back.
                    log.warning("checkpoint_skipped_lease_expired", source=connector.name, stream=batch.stream)
                    break
                await self.sink.save_checkpoint(connector.name, batch.stream, batch.checkpoint)
                stored += len(batch.records)
                self._batch_done(worker, batch, time.monotonic() - started)
                await self._save_status(worker)
        finally:
            await batches.aclose()
        return stored

    def _batch_done(self, worker: _Worker, batch: Batch, seconds: float) -> None:
        status = self.status.get(worker.name)
        if status is not None:
            status.last_batch_at = _now()
            status.backlog = getattr(worker.connector, "backlog", None)
        self._notify("batch_stored", worker.name, batch, seconds)

    async def _next(self, batches: Any, worker: _Worker) -> Batch | None:
        """The next batch, or None when the source is done or it must halt."""
        done, result = await self._until(worker, anext(batches))
        if not done:
            return None
        return result

    async def _wait_between_passes(self, worker: _Worker) -> None:
        """Sleep until the next poll, or less when the connector reports a change (IMAP IDLE)."""
        wait_for_change = getattr(worker.connector, "wait_for_change", None)
        remaining = worker.next_poll - time.monotonic()
        if wait_for_change is None:
            await self._until(worker, asyncio.sleep(max(remaining, 0)))
        elif remaining > 0:
            try:
                await self._until(worker, wait_for_change(remaining))
            except Exception as exc:
                # The next pass finds out what is wrong and backs off if it must.
                log.warning("wait_failed", source=worker.name, error=_describe(exc))
        if time.monotonic() >= worker.next_poll - 0.001:
            # The coming pass is the interval's full poll.
            worker.next_poll = time.monotonic() + worker.interval

    async def _until(self, worker: _Worker, aw: Awaitable[Any], *, revocable: bool = True) -> tuple[bool, Any]:
        """Await ``aw`` unless the worker must halt first; (finished, result).

        StopAsyncIteration counts as finished with None.
        """
        step = asyncio.ensure_future(aw)
        halts = [asyncio.ensure_future(worker.stop.wait())]
        if revocable and self.leases is not None and worker.name in self._workers:
            halts.append(asyncio.ensure_future(self.leases.revoked(worker.name).wait()))
        try:
            await asyncio.wait({step, *halts}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for h in halts:
                h.cancel()
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
        if step.cancelled():
            return False, None
        try:
            return True, step.result()
        except StopAsyncIteration:
            return True, None

    def _revoked(self, worker: _Worker) -> bool:
        return self.leases is not None and worker.name in self._workers and self.leases.revoked(worker.name).is_set()

    def _halted(self, worker: _Worker) -> bool:
        return worker.stop.is_set() or self._revoked(worker)

    def _backoff(self, failures: int) -> float:
        # Exponential with full jitter: failing sources do not retry in lockstep.
        ceiling = min(self.backoff_max.total_seconds(), 2.0 ** min(failures, 20))
        return random.uniform(ceiling / 2, ceiling)

    # -- status -----------------------------------------------------------------------

    def _notify(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            callback = getattr(listener, event, None)
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:
                log.exception("listener_failed", listener=type(listener).__name__, event_name=event)

    async def _save_status(self, worker: _Worker, *, force: bool = False) -> None:
        """Keep the source's status document current (at most every few seconds mid-pass)."""
        save = getattr(self.sink, "save_source_status", None)
        status = self.status.get(worker.name)
        if save is None or status is None:
            return
        now = time.monotonic()
        if not force and now - worker.status_written < STATUS_EVERY_S:
            return
        worker.status_written = now
        fields: dict[str, Any] = {
            "kind": status.kind,
            "owner": self.owner,
            "state": status.state,
            "consecutive_failures": status.failures,
            "backlog": status.backlog,
        }
        if status.last_success is not None:
            fields["last_success"] = status.last_success
        if status.last_batch_at is not None:
            fields["last_batch_at"] = status.last_batch_at
        if status.last_error is not None:
            # The last error stays visible after a recovery; consecutive_failures says it is over.
            fields["last_error"] = status.last_error
            fields["last_error_at"] = status.last_error_at
        try:
            await save(worker.name, fields)
        except Exception as exc:
            log.warning("status_not_saved", source=worker.name, error=_describe(exc))


async def _quiet_close(connector: Connector) -> None:
    try:
        await connector.aclose()
    except Exception as exc:
        log.warning("close_failed", source=connector.name, error=_describe(exc))


def _now() -> datetime:
    return datetime.now().astimezone()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]
