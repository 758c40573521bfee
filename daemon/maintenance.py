"""Periodic upkeep while the daemon runs: the daily retention purge, and re-matching unmatched records.

Both run once at start, then the purge every day (when ``retention.days`` is
set) and the re-match every ``rematch.interval``. A failure is logged and
retried at the next turn; it never stops capture.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from . import admin
from .text import describe

log = structlog.get_logger(__name__)

PURGE_EVERY = timedelta(days=1)


@dataclass
class Schedule:
    """When each job is due next, on a monotonic clock (seconds)."""

    every: dict[str, float]
    due: dict[str, float] = field(default_factory=dict)

    def start(self, now: float) -> None:
        self.due = dict.fromkeys(self.every, now)

    def ready(self, now: float) -> list[str]:
        return [job for job, at in sorted(self.due.items()) if at <= now]

    def done(self, job: str, now: float) -> None:
        self.due[job] = now + self.every[job]

    def wait(self, now: float) -> float:
        return max(0.0, min(self.due.values()) - now) if self.due else float("inf")


def schedule_for(settings: Any) -> Schedule:
    every = {"rematch": settings.rematch.interval.total_seconds()}
    if settings.retention.days:
        every["purge"] = PURGE_EVERY.total_seconds()
    return Schedule(every)


async def run_job(store: Any, settings: Any, job: str) -> None:
    if job == "purge":
        await admin.purge(store, settings.retention.days)
    elif job == "rematch":
        await admin.rematch_unmatched(store)


async def maintenance_loop(
    store: Any,
    settings: Any,
    stop_event: asyncio.Event,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_pass: Callable[[list[str]], Awaitable[None] | None] | None = None,
) -> None:
    """Run the due jobs until ``stop_event`` is set. ``on_pass`` hears which jobs each pass ran (tests)."""
    schedule = schedule_for(settings)
    schedule.start(clock())
    while not stop_event.is_set():
        ran = []
        for job in schedule.ready(clock()):
            if stop_event.is_set():
                break
            try:
                await run_job(store, settings, job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("maintenance_failed", job=job, error=describe(exc))
            schedule.done(job, clock())
            ran.append(job)
        if on_pass is not None:
            result = on_pass(ran)
            if result is not None:
                await result
        delay = schedule.wait(clock())
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=None if delay == float("inf") else delay)
        except TimeoutError:
            pass


class Upkeep:
    """The maintenance loop as a background task of the daemon."""

    def __init__(self, store: Any, settings: Any):
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(maintenance_loop(store, settings, self._stop))

    async def stop(self, grace: float = 30.0) -> None:
        """Let the job in hand finish (up to ``grace`` seconds), then end the loop."""
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace)
        except TimeoutError:
            # Cut short: a purge or re-match resumes where it was at the next start.
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def start(store: Any, settings: Any) -> Upkeep:
    """Start periodic maintenance (purge, re-match) beside capture."""
    return Upkeep(store, settings)
