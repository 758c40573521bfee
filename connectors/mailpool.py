"""Parse fetched mail off the event loop, on every core.

Parsing is the cost of mail capture (the network is not), so a batch is
split across a process pool; a thread would hold the GIL against the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from multiprocessing import resource_tracker
from typing import Any

import structlog

from . import lifeline
from .base import describe
from .mail import normalize_email

log = structlog.get_logger(__name__)

# Imported once in the forkserver, so each worker starts warm while the mailbox logs in;
# importing lifeline there also ties the forkserver's life to the daemon's.
PRELOAD = ["commsync.connectors.lifeline", "commsync.connectors.mailpool", "inscriptis", "charset_normalizer"]
_HELPER_STOP_S = 5.0
# Messages per task handed to a worker.
TASK_SIZE = 50


@dataclass(frozen=True, slots=True)
class MailOptions:
    own_addresses: frozenset[str]
    internal_domains: frozenset[str]
    max_content_chars: int


def mail_options(settings: Any, own_addresses: frozenset[str]) -> MailOptions:
    """How mail is normalized under ``settings`` for a mailbox whose own addresses are ``own_addresses``."""
    return MailOptions(
        own_addresses=own_addresses,
        internal_domains=frozenset(settings.internal_domains),
        max_content_chars=settings.capture.max_content_chars,
    )


@dataclass(frozen=True, slots=True)
class RawMail:
    """One fetched message: its bytes, the server's received time, and where it came from."""

    raw: bytes
    received_at: datetime | None
    truncated: bool
    source: dict[str, Any]


def normalize_many(items: Sequence[RawMail], options: MailOptions) -> list[tuple[dict[str, Any] | None, str | None]]:
    """Normalize each item; a failure costs that item only (with its reason)."""
    out: list[tuple[dict[str, Any] | None, str | None]] = []
    for item in items:
        try:
            record = normalize_email(
                item.raw,
                own_addresses=options.own_addresses,
                internal_domains=options.internal_domains,
                received_at=item.received_at,
                max_content_chars=options.max_content_chars,
                truncated_fetch=item.truncated,
            )
        except Exception as exc:  # the normalizer should not raise; one message must not stop a worker
            out.append((None, describe(exc)))
            continue
        record["sources"] = [item.source]
        out.append((record, None))
    return out


class ParsePool:
    """A process pool that replaces itself when one of its workers dies, and ends with the daemon.

    A worker killed mid-parse (the OOM killer, a crash in C code) breaks a
    ProcessPoolExecutor for good; without a replacement every mailbox would
    fail from then on. Its processes die with the daemon however it dies
    (see lifeline), and ``shutdown`` ends every one of them, the forkserver
    and the resource tracker included, so that nothing outlives a clean stop.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        _no_main_in_workers()
        # The forkserver would otherwise start with the first batch; starting it
        # now lets its start-up and imports overlap login and SEARCH.
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # forkserver: forking a process that runs threads (IMAP, the driver) is unsafe.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        forkserver_pid = _ensure_forkserver()
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=lifeline.die_with_parent, initargs=(forkserver_pid,))

    def replace(self, broken: ProcessPoolExecutor) -> None:
        """Start a fresh pool if ``broken`` is still the current one."""
        if self.executor is broken:
            # Before Python 3.12 a broken pool does not stop its surviving workers, and
            # its manager thread waits for them forever (at exit too): end them here.
            for process in list((getattr(broken, "_processes", None) or {}).values()):
                process.kill()
            broken.shutdown(wait=False, cancel_futures=True)
            self.executor = self._start()

    def shutdown(self) -> None:
        """Stop the workers, then the forkserver and the resource tracker, and wait for each."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        # The executor's queues hold semaphores the tracker would otherwise report as leaked.
        gc.collect()
        forkserver = multiprocessing.forkserver._forkserver
        tracker = resource_tracker._resource_tracker
        # The forkserver ends once nothing holds its "alive" pipe (the workers are gone
        # now), the tracker once nothing holds its pipe (the forkserver neither).
        # Both are private CPython API (its own tests stop them this way).
        stopped = _stop_helper("forkserver", getattr(forkserver, "_forkserver_pid", None), forkserver._stop)
        if stopped:
            _stop_helper("resource_tracker", getattr(tracker, "_pid", None), tracker._stop)


def _no_main_in_workers() -> None:
    """Keep multiprocessing from running the console script again in every worker.

    A child process re-imports the parent's ``__main__`` (for `commsync` that is
    the whole CLI: 900 modules, about 25 MB in each worker) unless the main
    module's spec is named ``__main__``, which multiprocessing then skips. The
    workers only need what the forkserver preloads.
    """
    import importlib.machinery
    import sys

    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None and getattr(main, "__file__", None):
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)


def _ensure_forkserver() -> int | None:
    """Start the forkserver (and the resource tracker) if they are not running; the forkserver's pid."""
    # The forkserver dies with this process (lifeline): only a child of the main thread
    # may arm that (a child of another thread would die with the thread), and only the
    # forkserver sees the variable (a later child, say a commsync command, must not arm).
    if threading.current_thread() is threading.main_thread():
        os.environ[lifeline.OWNER_ENV] = str(os.getpid())
    try:
        multiprocessing.forkserver.ensure_running()
    except OSError:
        return None  # the pool starts it on first use, and reports a failure then
    finally:
        os.environ.pop(lifeline.OWNER_ENV, None)
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)


def _stop_helper(name: str, pid: int | None, stop: Callable[[], None]) -> bool:
    """Run ``stop`` (which waits for the process to end); SIGKILL the process if that takes long."""
    if pid is None:
        return True
    # Normally instant; a helper that does not end must not hang the daemon's exit.
    guard = threading.Timer(_HELPER_STOP_S, _kill, (pid,))
    guard.start()
    try:
        stop()
    except Exception as exc:
        log.warning("parse_pool_stop_failed", process=name, error=describe(exc))
        return False
    finally:
        guard.cancel()
    return True


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


Parsed = list[tuple[dict[str, Any] | None, str | None]]


class MailParser:
    """Normalizes batches of RawMail in a ParsePool, or in a thread when there is none."""

    def __init__(self, options: MailOptions, pool: ParsePool | None = None, *, workers: int = 1):
        self.options = options
        self.pool = pool
        self.workers = pool.workers if pool is not None else max(1, workers)

    async def parse(self, items: Sequence[RawMail]) -> Parsed:
        if not items:
            return []
        if self.pool is None:
            return await asyncio.to_thread(normalize_many, items, self.options)
        executor = self.pool.executor
        loop = asyncio.get_running_loop()
        # Small parts, queued: a worker that finishes early takes the next one instead of
        # waiting for the one that drew the heavy newsletters.
        size = max(1, min(TASK_SIZE, -(-len(items) // self.workers)))
        parts = [items[i : i + size] for i in range(0, len(items), size)]
        try:
            results = await asyncio.gather(*(loop.run_in_executor(executor, normalize_many, part, self.options) for part in parts))
        except BrokenProcessPool:
            log.warning("parse_pool_broken", messages=len(items), next="parsing this batch one message at a time")
            self.pool.replace(executor)
            return await self._one_by_one(items)
        return [pair for part in results for pair in part]

    async def _one_by_one(self, items: Sequence[RawMail]) -> Parsed:
        """Find the message that kills a worker: it is skipped, the others are parsed."""
        loop = asyncio.get_running_loop()
        out: Parsed = []
        for item in items:
            executor = self.pool.executor
            try:
                out += await loop.run_in_executor(executor, normalize_many, [item], self.options)
            except BrokenProcessPool:
                self.pool.replace(executor)
                out.append((None, "the parser process died on this message"))
        return out
