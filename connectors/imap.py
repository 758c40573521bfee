"""IMAP mailboxes: incremental by UIDVALIDITY and UID per folder, read-only, in batches.

imapclient is blocking, so each connector drives its connection from one
thread of its own; the event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import imapclient
import imapclient.imapclient
import structlog
from imapclient.exceptions import LoginError

from commsync.config.models import MailboxConfig

from .base import AuthError, Batch
from .parsing import MailParser, RawMail

log = structlog.get_logger(__name__)

INBOX = "INBOX"
# UIDs per RFC822.SIZE fetch when planning batches: one short command per window.
SIZE_WINDOW = 5000


def tls_context(verify: bool, ca_file: Any = None) -> ssl.SSLContext:
    """Verified TLS by default; an extra CA file adds a private authority."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=str(ca_file))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ImapConnector:
    """One configured mailbox."""

    kind = "imap"

    def __init__(
        self,
        config: MailboxConfig,
        parser: MailParser,
        *,
        max_message_bytes: int = 25 * 1024 * 1024,
        max_batch_bytes: int = 64 * 1024 * 1024,
    ):
        self.config = config
        self.name = config.name
        self.parser = parser
        self.max_message_bytes = max_message_bytes
        self.max_batch_bytes = max_batch_bytes
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"imap-{config.name}")
        self._client: imapclient.IMAPClient | None = None
        self._log = log.bind(source=self.name)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    # -- connection ------------------------------------------------------------

    def _connect_blocking(self) -> imapclient.IMAPClient:
        cfg = self.config
        context = tls_context(cfg.tls_verify, cfg.ca_file)
        timeout = cfg.timeout.total_seconds()
        client = imapclient.IMAPClient(
            cfg.host, port=cfg.effective_port, ssl=cfg.security == "tls", ssl_context=context, timeout=timeout
        )
        try:
            if cfg.security == "starttls":
                client.starttls(context)
            client.login(cfg.username, cfg.read_password())
        except LoginError as exc:
            _quiet_close(client)
            raise AuthError(f"login refused for {cfg.username}: {_text(exc)}") from None
        except BaseException:
            _quiet_close(client)
            raise
        # Keep INTERNALDATE's own offset instead of converting to local naive time.
        client.normalise_times = False
        return client

    async def _connected(self) -> imapclient.IMAPClient:
        if self._client is not None:
            try:
                await self._call(self._client.noop)
                return self._client
            except Exception:
                self._log.info("imap_reconnect")
                await self._drop()
        self._client = await self._call(self._connect_blocking)
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._call(_quiet_close, client)

    async def aclose(self) -> None:
        await self._drop()
        self._thread.shutdown(wait=False)

    async def check(self) -> str:
        client = await self._connected()
        folders = await self._folders(client)
        return f"login ok; folders: {', '.join(folders)}"

    async def _folders(self, client: imapclient.IMAPClient) -> list[str]:
        if self.config.folders is not None:
            return list(self.config.folders)
        folders = [INBOX]
        sent = await self._call(client.find_special_folder, imapclient.imapclient.SENT)
        if sent and sent not in folders:
            folders.append(sent)
        return folders

    # -- sync -----------------------------------------------------------------------

    async def batches(self, state: Mapping[str, dict[str, Any]]) -> AsyncIterator[Batch]:
        """Every message newer than ``state``, folder by folder, a batch at a time."""
        try:
            client = await self._connected()
            for folder in await self._folders(client):
                async for batch in self._folder_batches(client, folder, state.get(folder)):
                    yield batch
        except BaseException:
            # A half-read connection cannot be trusted for the next pass.
            await self._drop()
            raise

    async def _folder_batches(
        self, client: imapclient.IMAPClient, folder: str, checkpoint: dict[str, Any] | None
    ) -> AsyncIterator[Batch]:
        # EXAMINE (read-only) as well as BODY.PEEK: capture never changes flags.
        info = await self._call(client.select_folder, folder, readonly=True)
        uidvalidity = int(info[b"UIDVALIDITY"])
        reset = checkpoint is not None and checkpoint.get("uidvalidity") != uidvalidity
        last_uid = 0 if checkpoint is None or reset else int(checkpoint.get("last_uid", 0))
        if reset:
            self._log.warning("uidvalidity_changed", folder=folder, old=checkpoint.get("uidvalidity"), new=uidvalidity)
        drop = {"kind": "imap", "source": self.name, "folder": folder, "uidvalidity": {"$ne": uidvalidity}} if reset else None

        criteria: list[Any] = ["UID", f"{last_uid + 1}:*"]
        if last_uid == 0 and self.config.since is not None:
            criteria += ["SINCE", self.config.since]
        # "n:*" always matches the highest UID, even below n.
        uids = sorted(u for u in await self._call(client.search, criteria) if u > last_uid)
        self._log.info("folder_scan", folder=folder, uidvalidity=uidvalidity, after_uid=last_uid, new=len(uids))
        if not uids:
            if reset or checkpoint is None:
                yield Batch(folder, [], {"uidvalidity": uidvalidity, "last_uid": last_uid}, drop_sources=drop)
            return

        chunks = await self._chunks(client, uids)
        pending = asyncio.ensure_future(self._fetch(client, folder, uidvalidity, chunks[0]))
        try:
            for n, chunk in enumerate(chunks):
                raw = await pending
                # Fetch the next chunk while this one is parsed and stored.
                pending = asyncio.ensure_future(self._fetch(client, folder, uidvalidity, chunks[n + 1])) if n + 1 < len(chunks) else None
                records, skipped = await self._normalize(raw, len(chunk), folder)
                yield Batch(
                    folder,
                    records,
                    {"uidvalidity": uidvalidity, "last_uid": chunk[-1]},
                    drop_sources=drop if n == 0 else None,
                    skipped=skipped,
                )
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    async def _chunks(self, client: imapclient.IMAPClient, uids: list[int]) -> list[list[int]]:
        """Split ``uids`` into fetches bounded by message count and by bytes.

        A count alone is not enough: 500 messages with large attachments would
        hold gigabytes in memory at once. Sizes come from one cheap
        RFC822.SIZE fetch per window of UIDs.
        """
        count, budget = self.config.batch_size, self.max_batch_bytes
        chunks: list[list[int]] = []
        current: list[int] = []
        used = 0
        for start in range(0, len(uids), SIZE_WINDOW):
            window = uids[start : start + SIZE_WINDOW]
            sizes = await self._call(client.fetch, window, ["RFC822.SIZE"])
            for uid in window:
                size = min(int(sizes.get(uid, {}).get(b"RFC822.SIZE") or 0), self.max_message_bytes)
                if current and (len(current) >= count or used + size > budget):
                    chunks.append(current)
                    current, used = [], 0
                current.append(uid)
                used += size
        if current:
            chunks.append(current)
        return chunks

    async def _fetch(self, client: imapclient.IMAPClient, folder: str, uidvalidity: int, uids: list[int]) -> list[RawMail]:
        limit = self.max_message_bytes
        # A partial fetch caps what one huge message costs; small ones arrive whole.
        response = await self._call(client.fetch, uids, [f"BODY.PEEK[]<0.{limit}>", "INTERNALDATE", "RFC822.SIZE"])
        out = []
        for uid in uids:
            data = response.get(uid)
            body = _body(data) if data else None
            if body is None:
                # Expunged between SEARCH and FETCH: nothing to capture.
                self._log.info("message_vanished", folder=folder, uid=uid)
                continue
            size = int(data.get(b"RFC822.SIZE") or len(body))
            out.append(
                RawMail(
                    raw=body,
                    received_at=_utc(data.get(b"INTERNALDATE")),
                    truncated=size > len(body),
                    source={"kind": "imap", "source": self.name, "folder": folder, "uidvalidity": uidvalidity, "uid": uid},
                )
            )
        return out

    async def _normalize(self, raw: list[RawMail], asked: int, folder: str) -> tuple[list[dict[str, Any]], int]:
        records = []
        skipped = asked - len(raw)
        for item, (record, reason) in zip(raw, await self.parser.parse(raw), strict=True):
            if record is None:
                skipped += 1
                self._log.warning("message_skipped", folder=folder, uid=item.source["uid"], reason=reason)
            else:
                records.append(record)
        return records, skipped


def _body(data: Mapping[bytes, Any]) -> bytes | None:
    for key, value in data.items():
        if key.startswith(b"BODY[]") and value is not None:
            return bytes(value)
    return None


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _text(exc: BaseException) -> str:
    text = str(exc)
    return text.decode(errors="replace") if isinstance(text, bytes) else text


def _quiet_close(client: imapclient.IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass
