"""Parse fetched mail off the event loop, on every core.

Parsing is the cost of mail capture (the network is not), so a batch is
split across a process pool; a thread would hold the GIL against the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .mail import normalize_email


@dataclass(frozen=True, slots=True)
class MailOptions:
    own_addresses: frozenset[str]
    internal_domains: frozenset[str]
    max_content_chars: int


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
            out.append((None, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        record["sources"] = [item.source]
        out.append((record, None))
    return out


class MailParser:
    """Normalizes batches of RawMail in ``executor`` (a process pool), or inline when None."""

    def __init__(self, options: MailOptions, executor: Executor | None = None, *, workers: int = 1):
        self.options = options
        self.executor = executor
        self.workers = max(1, workers)

    async def parse(self, items: Sequence[RawMail]) -> list[tuple[dict[str, Any] | None, str | None]]:
        if not items:
            return []
        if self.executor is None:
            return await asyncio.to_thread(normalize_many, items, self.options)
        loop = asyncio.get_running_loop()
        size = -(-len(items) // self.workers)
        parts = [items[i : i + size] for i in range(0, len(items), size)]
        results = await asyncio.gather(
            *(loop.run_in_executor(self.executor, normalize_many, part, self.options) for part in parts)
        )
        return [pair for part in results for pair in part]
