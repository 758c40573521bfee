"""The runner: one supervised task per source.

It owns what connectors must not: storing each batch, saving its checkpoint
only after the batch is stored, retries decided by the error's class (see
retry.py), parking a source whose credentials are refused for days, waiting
between passes (or for the connector's push, e.g. IMAP IDLE), leases when
several instances share the sources, each source's status, and a shutdown
that finishes the batch in hand within a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from commsync.connectors import registry
from commsync.connectors.base import Batch, Connector, ReportsProblems, WaitsForChange, backlog_of

from . import retry
from .clock import aware, now_utc
from .sinks import DryRunSink, KeepsStatus, Sink, StoreSink
from .text import describe, field_name

log = structlog.get_logger(__name__)

__all__ = ["DryRunSink", "Runner", "SourceStatus", "StoreSink"]

# How often, at most, a source's status document is written between passes.
STATUS_EVERY_S = 5.0
# How often a parked source looks for `commsync source resume`.
PARK_POLL_S = 10.0


@dataclass
class SourceStatus:
    name: str
    kind: str
    passes: int = 0
    records: int = 0
    # Consecutive failed passes of any kind, and of refused credentials alone.
    failures: int = 0
    refusals: int = 0
    refused_since: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    # The newest error, kept after a success clears last_error: the status document
    # shows it even when it could not be saved at the time (MongoDB itself was down).
    recent_error: str | None = None
    last_success: datetime | None = None
    last_batch_at: datetime | None = None
    # The newest item ever captured from the source: how fresh it is.
    newest_item_at: datetime | None = None
    backlog: int | None = None
    # starting | waiting for lease | syncing | waiting | backoff | parked | stopped
    state: str = "starting"
    parked_reason: str | None = None
    parked_at: datetime | None = None
    # What the connector reports as wrong without failing (a missing folder, a restored mailbox).
    problems: dict[str, str] = field(default_factory=dict)
    # The last verify of each stream: its counts and time (daemon/verify.py StreamReport.counts).
    verified: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    # The batch being stored and checkpointed now (shielded from cancellation).
    in_hand: asyncio.Future[None] | None = None
    in_hand_batch: Batch | None = None
    # Crashes (bugs outside a pass) since the last successful pass: the crash backoff's attempt.
    crashes: int = 0
    # The source's fingerprint (its config and secret files): computed once here, since it may
    # cost a PBKDF2 on the event loop; only a parked worker looks for a new one (_wait_parked).
    fingerprint: str | None = field(init=False, default=None)
    # The source's fingerprint when it was parked: a new one (a secret file written anew) un-parks it.
    parked_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.fingerprint = _fingerprint(self.connector)

    @property
    def name(self) -> str:
        return self.connector.name


class Runner:
    """Supervises one task per connector until stopped (or for one pass with ``once``).

    Sources can be added and removed while it runs (a config reload). With
    ``leases`` (a LeaseKeeper) a source is worked only while this instance
    holds its lease. ``listeners`` get optional callbacks: ``batch_stored(source,
    batch, seconds)``, ``pass_succeeded(status)``, ``pass_failed(status)``,
    ``source_parked(status)``, ``source_verified(name, reports)``, ``source_removed(name)``. Source status documents
    are kept when the sink can (`KeepsStatus`) and ``publish_status`` is on
    (not for a one-off pass by hand).
    """

    def __init__(
        self,
        connectors: Sequence[Connector],
        sink: Sink,
        *,
        once: bool = False,
        poll_interval: timedelta = timedelta(minutes=1),
        intervals: Mapping[str, timedelta] | None = None,
        policy: retry.RetryPolicy | None = None,
        leases: Any = None,
        listeners: Sequence[Any] = (),
        shutdown_timeout: timedelta = timedelta(seconds=60),
        publish_status: bool | None = None,
        after_pass: Any = None,
    ):
        self.sink = sink
        self.once = once
        self.poll_interval = poll_interval
        self.intervals = dict(intervals or {})
        self.policy = policy or retry.RetryPolicy()
        self.leases = leases
        self.listeners = list(listeners)
        self.shutdown_timeout = shutdown_timeout.total_seconds()
        self.publish_status = (not once) if publish_status is None else publish_status
        # Upkeep after a pass that caught up (quarantine retries, scheduled verify): upkeep.PassUpkeep.
        self.after_pass = after_pass
        self.status: dict[str, SourceStatus] = {}
        # Errors whose status document could not be written (MongoDB itself was down): written
        # when it answers again, even if the source has moved to another instance meanwhile.
        self._unsaved_errors: dict[str, tuple[str, datetime]] = {}
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
            log.info("stopping", deadline_s=self.shutdown_timeout)
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
        flusher = asyncio.create_task(self._flush_errors_every(1.0), name="unsaved-errors") if self._keeps_status else None
        for worker in self._workers.values():
            self._start(worker)
        clean = False
        try:
            if not self.once:
                await self._stop.wait()
                clean = await self._drain()
            else:
                # Workers added while we wait are in the dict too; keep gathering until none is left running.
                while pending := self._pending():
                    await asyncio.gather(*pending)
                clean = True
        finally:
            self._running = False
            if not clean:
                # Cancelled (the process is dying) or past the deadline: leases are left to expire, like a crash.
                await self._cancel_workers()
            if flusher is not None:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
                if clean:
                    await self._flush_errors()
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                if clean:
                    await self.leases.release_all()
        return all(s.last_error is None for s in self.status.values())

    def _pending(self) -> list[asyncio.Task[None]]:
        return [w.task for w in self._workers.values() if w.task is not None and not w.task.done()]

    async def _drain(self) -> bool:
        """After a stop: let the workers finish the batch in hand, for at most the shutdown deadline."""
        deadline = time.monotonic() + self.shutdown_timeout
        while pending := self._pending():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(pending, timeout=left)
        late = [w for w in self._workers.values() if w.task is not None and not w.task.done()]
        for worker in late:
            batch = worker.in_hand_batch
            log.warning(
                "shutdown_abandoned",
                source=worker.name,
                deadline_s=self.shutdown_timeout,
                # The next start re-reads from the last checkpoint: abandoned work is redone, never lost.
                in_hand=f"{batch.stream}: {len(batch.records)} records" if batch is not None else "reading",
            )
        return not late

    async def _cancel_workers(self) -> None:
        for worker in self._workers.values():
            if worker.task is not None:
                worker.task.cancel()
        await asyncio.gather(*(w.task for w in self._workers.values() if w.task), return_exceptions=True)

    async def _supervise(self, worker: _Worker) -> None:
        try:
            while True:
                try:
                    await self._work(worker)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug outside a pass: logged with its traceback, retried, and the others go on.
                    # A successful pass resets the count: a crash weeks later waits the first step again.
                    worker.crashes += 1
                    log.exception("worker_crashed", source=worker.name, crashes=worker.crashes)
                    if self.once:
                        return
                    await self._until(worker, asyncio.sleep(self.policy.delay(retry.ERROR, worker.crashes)), revocable=False)
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
                await self._restore(worker)
                bound.info("source_started", owner=self.owner)
            if status.state == "parked":
                await self._wait_parked(worker)
                if status.state == "parked":
                    if worker.stop.is_set() or leases is None:
                        break  # stopping
                    # The lease was revoked (lost, or yielded to a rebalance): give it back
                    # and compete again; whoever works the source next finds it parked.
                    await leases.give_back(worker.name)
                    worker.started = False
                    continue
            status.state = "syncing"
            try:
                stored = await self.run_pass(connector, worker)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                wait = await self._failed(worker, exc, bound)
                if self.once:
                    return
                if wait is not None:
                    await self._until(worker, asyncio.sleep(wait))
            else:
                await self._succeeded(worker, stored)
                if self.once:
                    return
                if worker.complete and self.after_pass is not None:
                    await self._upkeep(worker)
                await self._wait_between_passes(worker)
            if leases is not None and (self._revoked(worker) or not leases.holds(worker.name)) and not worker.stop.is_set():
                await leases.give_back(worker.name)
                worker.started = False

    async def _succeeded(self, worker: _Worker, stored: int) -> None:
        status = self.status[worker.name]
        worker.crashes = 0
        status.records += stored
        status.problems = _problems(worker.connector)
        if worker.complete:
            # A pass cut short (a stop, a lost lease) is no success: the source is not caught up.
            status.passes += 1
            status.failures = status.refusals = 0
            status.refused_since = None
            status.last_error = None
            status.last_success = now_utc()
            status.backlog = 0 if backlog_of(worker.connector) is not None else None
        status.state = "waiting"
        self._notify("pass_succeeded", status)
        await self._save_status(worker, force=True)

    async def _failed(self, worker: _Worker, exc: Exception, bound: Any) -> float | None:
        """Count and log a failed pass; the seconds to wait before the next, or None when the source is parked now."""
        status = self.status[worker.name]
        kind = retry.classify(exc)
        now = now_utc()
        status.failures += 1
        status.last_error = status.recent_error = describe(exc)
        status.last_error_at = now
        status.problems = _problems(worker.connector)
        if kind == retry.REFUSED:
            status.refusals += 1
            status.refused_since = status.refused_since or now
        else:
            # An outage between refusals does not prove the credentials work again, so
            # refused_since stays; only a successful pass clears it.
            status.refusals = 0
        attempt = status.refusals if kind == retry.REFUSED else status.failures
        wait = self.policy.delay(kind, attempt, getattr(exc, "retry_after", None))
        fields = {"error": status.last_error, "failures": status.failures, "retry_in_s": round(wait, 1)}
        if kind == retry.ERROR and status.failures == 1:
            # The first of a run gets its traceback; the retries one line each.
            bound.error("source_failed", **fields, exc_info=exc)
        elif kind == retry.REFUSED:
            bound.error("source_failed", reason="credentials_refused", refused_since=status.refused_since.isoformat(), **fields)
        else:
            bound.warning("source_failed", reason=kind, **fields)
        self._notify("pass_failed", status)
        if kind == retry.REFUSED and not self.once and self.policy.parks(status.refused_since, now):
            await self._park(worker)
            return None
        status.state = "backoff"
        await self._save_status(worker, force=True)
        return wait

    async def _upkeep(self, worker: _Worker) -> None:
        """The after-pass work, interrupted by a stop or a lost lease like a pass; never fails the source."""
        try:
            done, reports = await self._until(worker, self.after_pass(worker.connector))
        except Exception as exc:
            log.warning("upkeep_failed", source=worker.name, error=describe(exc))
            return
        if done and reports:
            status = self.status.get(worker.name)
            if status is not None:
                status.verified.update({r.stream: r.counts() for r in reports if r.stream != "*"})
            self._notify("source_verified", worker.name, reports)

    # -- parking -------------------------------------------------------------------------

    async def _park(self, worker: _Worker) -> None:
        status = self.status[worker.name]
        status.state = "parked"
        status.parked_at = now_utc()
        since = status.refused_since or status.parked_at
        status.parked_reason = f"credentials refused since {since.astimezone(UTC):%Y-%m-%d %H:%M}Z"
        worker.parked_fingerprint = worker.fingerprint
        log.error(
            "source_parked",
            source=worker.name,
            reason=status.parked_reason,
            resume=f"fix the credentials and reload, or `commsync source resume {worker.name}`",
        )
        self._notify("source_parked", status)
        await self._save_status(worker, force=True)

    async def _wait_parked(self, worker: _Worker) -> None:
        """Stay parked, without a login, until asked to try again, or the worker stops or loses its lease.

        Tried again on `commsync source resume` (``resume_requested_at`` in the
        status document) or when the source's fingerprint changes (a secret
        file written anew: no reload needed). A status document that cannot be
        read (MongoDB down) is an outage: the source stays parked and looks again.
        """
        status = self.status[worker.name]
        load = getattr(self.sink, "load_source_status", None) if self._keeps_status else None
        unreadable = False
        while not worker.stop.is_set() and not self._revoked(worker):
            fingerprint = _fingerprint(worker.connector)
            changed = fingerprint != worker.parked_fingerprint
            doc = None
            if load is not None and not changed:
                try:
                    doc = await load(worker.name)
                except Exception as exc:
                    if not unreadable:
                        log.warning("parked_status_not_loaded", source=worker.name, error=describe(exc))
                    unreadable = True
                else:
                    unreadable = False
            asked = aware((doc or {}).get("resume_requested_at"))
            if changed or (asked is not None and status.parked_at is not None and asked > status.parked_at):
                if changed:
                    log.info("source_resumed", source=worker.name, reason="credentials_changed")
                else:
                    log.info("source_resumed", source=worker.name, asked_at=asked.isoformat())
                status.state = "starting"
                status.parked_reason = status.parked_at = status.refused_since = None
                status.refusals = 0
                worker.parked_fingerprint = None
                worker.fingerprint = fingerprint
                await self._save_status(worker, force=True)
                return
            await self._until(worker, asyncio.sleep(PARK_POLL_S))

    async def _restore(self, worker: _Worker) -> None:
        """Pick up what the source's status document remembers: freshness, a refusal run, parking."""
        if not self._keeps_status:
            return
        try:
            doc = await self.sink.load_source_status(worker.name) or {}  # type: ignore[attr-defined]
        except Exception as exc:
            log.warning("status_not_loaded", source=worker.name, error=describe(exc))
            return
        status = self.status[worker.name]
        status.newest_item_at = _later(status.newest_item_at, aware(doc.get("newest_item_at")))
        status.last_success = status.last_success or aware(doc.get("last_success"))
        for key, counts in (doc.get("verified") or {}).items():
            status.verified.setdefault(field_name(key), {**counts, "at": aware(counts.get("at"))})
        fingerprint = worker.fingerprint
        if doc.get("fingerprint") != fingerprint:
            return  # the source's config changed: whatever it refused before is worth a new try
        status.refused_since = aware(doc.get("refused_since"))
        parked_at = aware(doc.get("parked_at"))
        resumed = aware(doc.get("resume_requested_at"))
        if doc.get("state") == "parked" and parked_at is not None and not (resumed and resumed > parked_at):
            status.state = "parked"
            status.parked_at = parked_at
            status.parked_reason = doc.get("parked_reason")
            worker.parked_fingerprint = fingerprint
            log.warning("source_still_parked", source=worker.name, reason=status.parked_reason)

    @property
    def _keeps_status(self) -> bool:
        return self.publish_status and isinstance(self.sink, KeepsStatus)

    # -- one pass ------------------------------------------------------------------------

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
                worker.in_hand_batch = batch
                worker.in_hand = asyncio.ensure_future(self._commit(connector, batch))
                try:
                    committed = await asyncio.shield(worker.in_hand)
                finally:
                    worker.in_hand_batch = None
                if not committed:
                    break
                stored += len(batch.records)
                self._batch_done(worker, batch, time.monotonic() - started)
                await self._save_status(worker)
        finally:
            await batches.aclose()
        return stored

    async def _commit(self, connector: Connector, batch: Batch) -> bool:
        """Store ``batch``, then save its checkpoint; False when the lease was lost meanwhile."""
        await self.sink.write(connector.name, batch)
        if self.leases is not None and not self.leases.holds(connector.name):
            # The write outlived the lease: the records are in (upserts, harmless twice),
            # but the checkpoint is the new owner's to move now, never ours to move back.
            log.warning("checkpoint_skipped_lease_expired", source=connector.name, stream=batch.stream)
            return False
        if batch.retired:
            await self.sink.forget_checkpoint(connector.name, batch.stream)
        else:
            await self.sink.save_checkpoint(connector.name, batch.stream, batch.checkpoint)
        return True

    def _batch_done(self, worker: _Worker, batch: Batch, seconds: float) -> None:
        status = self.status.get(worker.name)
        if status is not None:
            status.last_batch_at = now_utc()
            status.backlog = backlog_of(worker.connector)
            newest = max((r["occurred_at"] for r in batch.records if isinstance(r.get("occurred_at"), datetime)), default=None)
            status.newest_item_at = _later(status.newest_item_at, newest)
        self._notify("batch_stored", worker.name, batch, seconds)

    async def _next(self, batches: Any, worker: _Worker) -> Batch | None:
        """The next batch, or None when the source is done or it must halt."""
        done, result = await self._until(worker, anext(batches))
        if not done:
            return None
        return result

    async def _wait_between_passes(self, worker: _Worker) -> None:
        """Sleep until the next poll, or less when the connector reports a change (IMAP IDLE)."""
        remaining = worker.next_poll - time.monotonic()
        if not isinstance(worker.connector, WaitsForChange):
            await self._until(worker, asyncio.sleep(max(remaining, 0)))
        elif remaining > 0:
            try:
                await self._until(worker, worker.connector.wait_for_change(remaining))
            except Exception as exc:
                # The next pass finds out what is wrong and backs off if it must.
                log.warning("wait_failed", source=worker.name, error=describe(exc))
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
        status = self.status.get(worker.name)
        if not self._keeps_status or status is None:
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
            "refusals": status.refusals,
            "refused_since": status.refused_since,
            "backlog": status.backlog,
            "problems": status.problems,
            "parked_at": status.parked_at,
            "parked_reason": status.parked_reason,
            "fingerprint": worker.fingerprint,
        }
        for key in ("last_success", "last_batch_at", "newest_item_at"):
            if getattr(status, key) is not None:
                fields[key] = getattr(status, key)
        if status.recent_error is not None:
            # The last error stays visible after a recovery; consecutive_failures says it is over.
            fields["last_error"] = status.recent_error
            fields["last_error_at"] = status.last_error_at
        try:
            await self.sink.save_source_status(worker.name, fields)  # type: ignore[attr-defined]
        except Exception as exc:
            log.warning("status_not_saved", source=worker.name, error=describe(exc))
            if status.recent_error is not None and status.last_error_at is not None:
                self._unsaved_errors[worker.name] = (status.recent_error, status.last_error_at)
        else:
            self._unsaved_errors.pop(worker.name, None)

    async def _flush_errors_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self._flush_errors()

    async def _flush_errors(self) -> None:
        """Write the errors MongoDB could not take when they happened (only where nothing newer is there)."""
        for source, (error, at) in list(self._unsaved_errors.items()):
            try:
                await self.sink.save_error(source, error, at)  # type: ignore[attr-defined]
            except Exception:
                return  # still down: the next round tries again
            if self._unsaved_errors.get(source) == (error, at):
                del self._unsaved_errors[source]


def _problems(connector: Connector) -> dict[str, str]:
    return dict(connector.problems) if isinstance(connector, ReportsProblems) else {}


def _fingerprint(connector: Connector) -> str | None:
    config = getattr(connector, "config", None)
    return registry.fingerprint(config) if config is not None else None


async def _quiet_close(connector: Connector) -> None:
    try:
        await connector.aclose()
    except Exception as exc:
        log.warning("close_failed", source=connector.name, error=describe(exc))


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
