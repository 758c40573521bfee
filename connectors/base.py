"""The one protocol every source kind implements.

A connector knows its remote system and nothing else: it reads items newer
than a checkpoint, normalizes them into record dicts and yields them in
batches, each with the checkpoint that follows it. The runner owns retries,
backoff, storing, checkpointing and shutdown; a connector never touches
MongoDB.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Batch:
    """Normalized records plus the checkpoint to save once they are stored.

    ``stream`` names the checkpoint inside the source (an IMAP folder, a
    Twilio list). ``drop_sources`` describes source entries this source made
    earlier that are void now (a folder's new UIDVALIDITY), field by field;
    a value may be ``{"$ne": x}``. ``skipped`` counts items left out with a
    logged reason.
    """

    stream: str
    records: list[dict[str, Any]]
    checkpoint: dict[str, Any]
    drop_sources: Mapping[str, Any] | None = None
    skipped: int = 0


class AuthError(Exception):
    """The remote system refused our credentials: retrying will not help."""


class Connector(Protocol):
    """A source of records (one configured mailbox or Twilio account)."""

    name: str
    kind: str

    def batches(self, state: Mapping[str, dict[str, Any]]) -> AsyncIterator[Batch]:
        """Yield batches newer than ``state`` (checkpoints by stream)."""
        ...

    async def check(self) -> str:
        """Log in / make one cheap authenticated request; return a short summary."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
