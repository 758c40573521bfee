"""mbox archives (Gmail Takeout, Thunderbird): a backfill through the same path as IMAP."""

from __future__ import annotations

import asyncio
import mailbox
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from .base import Batch
from .mailpool import MailParser, RawMail

log = structlog.get_logger(__name__)


# mboxrd quoting: a body line "From ..." is stored as ">From ...", ">From" as ">>From".
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)


def _read_chunk(box: mailbox.mbox, keys: list[Any]) -> list[bytes]:
    # mailbox leaves the quoting in place; undo one level so content reads as sent.
    return [_QUOTED_FROM.sub(rb"\1", box.get_bytes(k)) for k in keys]


class MboxConnector:
    """One mbox file; the checkpoint is how many messages were stored, so an import resumes."""

    kind = "mbox"

    def __init__(self, path: Path, parser: MailParser, *, name: str | None = None, batch_size: int = 500):
        self.path = Path(path)
        self.name = name or f"mbox-{self.path.name}"
        self.parser = parser
        self.batch_size = batch_size
        # Messages indexed but not yet handed out (progress and status); None until indexed.
        self.backlog: int | None = None

    async def check(self) -> str:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} is not a file")
        return "readable"

    async def aclose(self) -> None:
        return None

    async def batches(self, state: Mapping[str, dict[str, Any]]) -> AsyncIterator[Batch]:
        done = int(state.get("messages", {}).get("done", 0))
        # Indexing scans the file once; the messages are read a chunk at a time.
        box = await asyncio.to_thread(mailbox.mbox, self.path, create=False)
        try:
            keys = (await asyncio.to_thread(box.keys))[done:]
            self.backlog = len(keys)
            for start in range(0, len(keys), self.batch_size):
                chunk = keys[start : start + self.batch_size]
                raws = await asyncio.to_thread(_read_chunk, box, chunk)
                items = [
                    RawMail(raw, None, False, {"kind": "mbox", "source": self.name, "file": self.path.name, "index": done + start + i})
                    for i, raw in enumerate(raws)
                ]
                records, skipped = [], 0
                for item, (record, reason) in zip(items, await self.parser.parse(items), strict=True):
                    if record is None:
                        skipped += 1
                        log.warning("message_skipped", source=self.name, index=item.source["index"], reason=reason)
                    else:
                        records.append(record)
                self.backlog = len(keys) - start - len(chunk)
                yield Batch("messages", records, {"done": done + start + len(chunk)}, skipped=skipped)
        finally:
            box.close()
