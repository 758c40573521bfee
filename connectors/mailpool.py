"""Parse fetched mail off the event loop, on every core.

Parsing is the cost of mail capture (the network is not), so a batch is
split across a process pool; a thread would hold the GIL against the loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from .base import describe
from .mail import normalize_email

log = structlog.get_logger(__name__)

# Imported once in the forkserver, so each worker starts warm while the mailbox logs in.
PRELOAD = ["commsync.connectors.mailpool", "inscriptis", "charset_normalizer"]


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
            out.append((None, describe(exc, 300)))
            continue
        record["sources"] = [item.source]
        out.append((record, None))
    return out


class ParsePool:
    """A process pool that replaces itself when one of its workers dies.

    A worker killed mid-parse (the OOM killer, a crash in C code) breaks a
    ProcessPoolExecutor for good; without a replacement every mailbox would
    fail from then on.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.executor = self._start()
        # The forkserver would otherwise start with the first batch; starting it
        # now lets its start-up and imports overlap login and SEARCH.
        try:
            multiprocessing.forkserver.ensure_running()
        except OSError:
            pass  # the pool starts it on first use, and reports a failure then

    def _start(self) -> ProcessPoolExecutor:
        # forkserver: forking a process that runs threads (IMAP, the driver) is unsafe.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return ProcessPoolExecutor(self.workers, mp_context=context)

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
        self.executor.shutdown(wait=True, cancel_futures=True)


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
        size = -(-len(items) // self.workers)
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
